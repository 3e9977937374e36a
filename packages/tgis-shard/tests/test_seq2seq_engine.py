"""The hf_transformers encoder-decoder engine against plain transformers generate() on the same weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from tests.support.engines import (
    NEW_TOKENS,
    PROMPTS,
    StepDriver,
    check_one_batch_equals_reference,
    check_sdpa_engine_or_refusal,
    cpu_engine,
    request,
    start_then_join,
)
from tests.support.prefixes import (
    check_prefix_outputs,
    reference_greedy_with_prefix,
    run_prefix_scenario,
    save_prefixes,
)
from tests.support.tiny_models import build_tiny_seq2seq_lm, reference_greedy
from tgis_proto import shard_pb2 as pb
from tgis_shard.engines.seq2seq import Seq2SeqLMEngine

# t5: relative position buckets; bart: learned absolute positions (encoder and decoder);
# t5-gated: the T5 v1.1 layout of flan-t5 / mT0 (gated-GELU feed-forward, untied LM head).
MODELS = {
    "t5": {"arch": "t5"},
    "bart": {"arch": "bart"},
    "t5-gated": {"arch": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_dir(request, tmp_path_factory):
    return build_tiny_seq2seq_lm(tmp_path_factory.mktemp(request.param), **MODELS[request.param])


def _engine(model_dir) -> Seq2SeqLMEngine:
    engine = cpu_engine(model_dir)
    assert isinstance(engine, Seq2SeqLMEngine)
    return engine


@pytest.fixture(scope="module")
def engine(model_dir):
    return _engine(model_dir)


def test_right_padded_batch_equals_unpadded_reference(engine, prompt_ids, expected):
    check_one_batch_equals_reference(engine, prompt_ids, expected)


def test_joining_and_pruning_mid_generation_changes_no_output(engine, prompt_ids, expected):
    driver = start_then_join(engine, prompt_ids)
    joining = engine.prefilled_batch
    driver.step()  # merges the joiners, then decodes all three
    running = engine.batch
    assert running.request_ids == [0, 1, 2]
    # The joining batch's caches were copied into the merged ones and let go, layer by layer.
    joined = [*joining.cache.self_attention_cache.layers, *joining.cache.cross_attention_cache.layers]
    assert all(layer.keys.numel() == layer.values.numel() == 0 for layer in joined)
    # The joined rows are at other decoder positions than the running one: left padding is in play.
    assert running.decoder_mask.sum(dim=1).tolist() == [5, 2, 2]
    driver.run(1)
    # Request 2 (the longest prompt) leaves: its encoder padding columns go with it.
    encoder_width = running.encoder_mask.shape[1]
    driver.leave(2)
    driver.step()
    assert running.encoder_mask.shape[1] < encoder_width
    # Request 0 (the oldest) leaves: its decoder padding columns go with it.
    decoder_width = running.decoder_mask.shape[1]
    driver.leave(0)
    driver.step()
    assert running.decoder_mask.shape[1] < decoder_width + 1  # the step's decode added one
    driver.run(NEW_TOKENS)
    assert driver.outputs[0] == expected[0][:7]
    assert driver.outputs[1][: len(expected[1])] == expected[1]
    assert driver.outputs[2] == expected[2][:3]
    driver.leave(1)
    driver.step()
    assert engine.batch is None
    assert engine.request_ids() == []


def test_token_details_are_log_softmax_of_the_first_decoder_step(engine, prompt_ids):
    ids = prompt_ids[2]
    driver = StepDriver(engine)
    driver.join(request(0, ids, NEW_TOKENS, logprobs=True, ranks=True, top_n=3, input_tokens=True))
    (token,) = driver.step()
    driver.leave(0)
    driver.step()
    with torch.no_grad():
        start = torch.tensor([[engine.decoder_start_token_id]])
        logits = engine.model(input_ids=torch.tensor([ids]), decoder_input_ids=start).logits[0, -1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    assert token.token_id == int(logprobs.argmax())
    assert token.logprob == pytest.approx(float(logprobs.max()), abs=1e-4)
    assert token.rank == 1
    top = logprobs.topk(3)
    assert [t[0] for t in token.top_tokens] == top.indices.tolist()
    assert [t[1] for t in token.top_tokens] == pytest.approx(top.values.tolist(), abs=1e-4)
    # The encoder scores no prompt token; the ids still come back.
    assert [t.id for t in token.input_tokens] == ids
    assert all(math.isnan(t.logprob) for t in token.input_tokens)


def test_encoder_prompt_prefixes_equal_transformers_on_prefixed_encoder_embeddings(model_dir, prompt_ids, tmp_path):
    # PEFT's seq2seq adapters hold an encoder and a decoder block; generation uses the encoder's.
    prefixes = save_prefixes(model_dir, tmp_path)
    engine = cpu_engine(model_dir, prefix_store_path=tmp_path)
    assert engine.prompt_prefix("team/long").length == 7
    check_prefix_outputs(model_dir, prompt_ids, prefixes, run_prefix_scenario(engine, prompt_ids))


def test_info_and_health_check(engine):
    engine.health_check()
    info = engine.info()
    assert info.model_kind == pb.ENCODER_DECODER
    assert info.batch_padding
    assert info.eos_token_ids == [1]


def test_decoder_with_more_layers_than_the_encoder(tmp_path):
    # T5's num_layers counts the encoder; transformers' DynamicCache(config=...) sizes from it, so
    # generate() itself fails here and the reference is an uncached greedy loop.
    engine = _engine(build_tiny_seq2seq_lm(tmp_path, arch="t5", num_decoder_layers=3))
    ids = AutoTokenizer.from_pretrained(tmp_path)(PROMPTS[0]).input_ids
    driver = StepDriver(engine)
    driver.join(request(0, ids, NEW_TOKENS))
    driver.run(4)
    decoded = [engine.decoder_start_token_id]
    with torch.no_grad():
        for _ in range(4):
            logits = engine.model(
                input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([decoded]), use_cache=False
            ).logits
            decoded.append(int(logits[0, -1].argmax()))
    assert driver.outputs[0] == decoded[1:]


def test_forced_first_token_of_the_generation_config_is_generated_first(tmp_path):
    # mBART-50 / NLLB style: generate() forces the target-language token as the first output.
    model_dir = build_tiny_seq2seq_lm(tmp_path / "bart", arch="bart")
    config_file = model_dir / "generation_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "forced_bos_token_id": 7}))
    expected = reference_greedy(model_dir, PROMPTS, NEW_TOKENS)
    assert all(tokens[0] == 7 for tokens in expected)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    check_one_batch_equals_reference(_engine(model_dir), prompt_ids, expected)


def _random_prefix(model_dir, length: int, seed: int) -> torch.Tensor:
    weight = AutoModelForSeq2SeqLM.from_pretrained(model_dir).get_input_embeddings().weight
    return torch.randn(length, weight.shape[1], generator=torch.Generator().manual_seed(seed)) * weight.std().item()


def test_tgis_encoder_and_decoder_prefix_files_equal_transformers(model_dir, prompt_ids, tmp_path):
    """TGIS's layout: encoder.pt before the encoder's input, decoder.pt before the decoder start
    token; either alone or both."""
    files = {"both": {"encoder.pt": (4, 1), "decoder.pt": (3, 2)}, "decoder": {"decoder.pt": (5, 3)}}
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for prefix_id, tensors in files.items():
        (tmp_path / prefix_id).mkdir()
        saved[prefix_id] = {name: _random_prefix(model_dir, n, seed) for name, (n, seed) in tensors.items()}
        for name, tensor in saved[prefix_id].items():
            torch.save(tensor, tmp_path / prefix_id / name)
    engine = cpu_engine(model_dir, prefix_store_path=tmp_path)
    assert engine.prompt_prefix("both").length == 7
    chosen = {0: "both", 1: "", 2: "decoder"}
    driver = StepDriver(engine)
    driver.join(*(request(i, prompt_ids[i], NEW_TOKENS, prefix_id=p) for i, p in chosen.items()))
    driver.run(3)
    driver.join(request(3, prompt_ids[0], NEW_TOKENS, prefix_id="both"))
    driver.run_until(NEW_TOKENS)
    outputs = driver.outputs
    chosen[3] = "both"
    for rid, prefix_id in chosen.items():
        tensors = saved.get(prefix_id, {})
        ids = prompt_ids[rid % 3]
        reference = reference_greedy_with_prefix(
            model_dir, tensors.get("encoder.pt"), ids, NEW_TOKENS, decoder_prefix=tensors.get("decoder.pt")
        )
        assert outputs[rid][: len(reference)] == reference, prefix_id
    plain = reference_greedy_with_prefix(model_dir, None, prompt_ids[2], NEW_TOKENS)
    assert outputs[2][: len(plain)] != plain  # the decoder prefix changed the output


def test_hf_optimum_bt_serves_encoder_decoders_with_sdpa_attention_or_refuses(model_dir, prompt_ids, expected):
    check_sdpa_engine_or_refusal(model_dir, prompt_ids, expected)
