"""T5 on tgis_native, 1 and 2 ranks (gloo), against plain transformers on the same weights:
same greedy tokens, close logprobs, requests joining and leaving mid-generation, 1/N weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.models.t5.modeling_t5 import T5Attention

from tests.support.engines import NEW_TOKENS, PROMPTS, StepDriver, native_engine, request, start_then_join
from tests.support.native_checks import check_prefixes_equal_transformers
from tests.support.prefixes import reference_greedy_with_prefix
from tests.support.ranks import run_ranks
from tests.support.tiny_models import build_tiny_seq2seq_lm, reference_greedy
from tgis_models_t5.model import relative_buckets

LOGPROB_TOLERANCE = 1e-4  # float32 on CPU; the sharded sums only reorder additions

CONFIGS = {
    # T5 1.0: ReLU feed-forward, decoder output scaled before the tied head.
    "v1.0-relu-tied": {},
    # T5 1.1 / flan-t5: gated GELU, no output scaling.
    "v1.1-gated": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    return build_tiny_seq2seq_lm(tmp_path_factory.mktemp(request.param), arch="t5", **CONFIGS[request.param])


def _reference_first_logprobs(model_dir, prompt_ids) -> list[torch.Tensor]:
    """log_softmax of the reference model's scores for the first decoder token of each prompt."""
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        return [
            torch.log_softmax(model(input_ids=torch.tensor([ids]), decoder_input_ids=start).logits[0, -1], dim=-1)
            for ids in prompt_ids
        ]


@pytest.fixture(scope="module")
def reference_logprobs(model_dir, prompt_ids):
    return _reference_first_logprobs(model_dir, prompt_ids)


def _scenario(rank: int, world_size: int, port: int, model_dir: str, prompt_ids: list[list[int]]) -> dict:
    """Request 0 runs alone, 1 and 2 join after three tokens, 2 leaves two steps later."""
    engine = native_engine(rank, world_size, port, model_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    driver = start_then_join(engine, prompt_ids, logprobs=True, ranks=True, top_n=2)
    driver.run(2)
    driver.leave(2)
    driver.run(NEW_TOKENS)
    engine.health_check()
    return {
        "engine": engine.info().engine,
        "outputs": driver.outputs,
        "first_logprobs": {rid: t.logprob for rid, t in driver.first.items()},
        "first_ranks": {rid: t.rank for rid, t in driver.first.items()},
        "weight_bytes": weight_bytes,
    }


@pytest.fixture(scope="module")
def run(model_dir, prompt_ids) -> Callable[[int], list[dict]]:
    """The scenario's per-rank results for a world size, run once per model (spawning ranks is slow)."""
    results: dict[int, list[dict]] = {}

    def results_for(world_size: int) -> list[dict]:
        if world_size not in results:
            results[world_size] = run_ranks(_scenario, world_size, str(model_dir), prompt_ids)
        return results[world_size]

    return results_for


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_t5_equals_transformers(run, expected, reference_logprobs, world_size):
    results = run(world_size)
    result = results[0]
    assert result["engine"] == "tgis_native"
    for i in (0, 1):
        # The reference stops at EOS; the engine keeps going until the router prunes it.
        assert result["outputs"][i][: len(expected[i])] == expected[i]
    assert result["outputs"][2][: len(expected[2])] == expected[2][:3]
    for i, reference in enumerate(reference_logprobs):
        token = expected[i][0]
        assert result["first_logprobs"][i] == pytest.approx(float(reference[token]), abs=LOGPROB_TOLERANCE)
        assert result["first_ranks"][i] == 1
    # Every rank followed the same tokens.
    assert all(r["outputs"] == result["outputs"] for r in results)


def test_each_rank_holds_about_half_the_weights(model_dir, run):
    full = sum(p.numel() * p.element_size() for p in AutoModelForSeq2SeqLM.from_pretrained(model_dir).parameters())
    (single,) = run(1)
    assert single["weight_bytes"] == pytest.approx(full, rel=0.01)
    for half in run(2):
        # Norms are replicated on every rank: a little over half.
        assert 0.5 * full < half["weight_bytes"] < 0.55 * full


def test_mt5_model_type_is_served_by_the_t5_plugin(tmp_path):
    model_dir = build_tiny_seq2seq_lm(tmp_path / "mt0", arch="t5", **CONFIGS["v1.1-gated"])
    config_file = model_dir / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_type": "mt5"}))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    driver = StepDriver(native_engine(0, 1, 0, model_dir))
    driver.join(*(request(i, ids, NEW_TOKENS, logprobs=True) for i, ids in enumerate(prompt_ids)))
    driver.run_until(NEW_TOKENS)
    expected = reference_greedy(model_dir, PROMPTS, NEW_TOKENS)
    for i, reference in enumerate(_reference_first_logprobs(model_dir, prompt_ids)):
        assert driver.outputs[i][: len(expected[i])] == expected[i]
        assert driver.first[i].logprob == pytest.approx(float(reference[expected[i][0]]), abs=LOGPROB_TOLERANCE)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
def test_relative_buckets_match_transformers_beyond_the_exact_range(bidirectional):
    relative = torch.arange(-300, 301)[None, :]
    ours = relative_buckets(relative, bidirectional, num_buckets=32, max_distance=128)
    theirs = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, theirs)


def test_encoder_prompt_prefixes_on_two_ranks_equal_transformers(tmp_path):
    model_dir = build_tiny_seq2seq_lm(tmp_path / "t5", arch="t5")
    check_prefixes_equal_transformers(model_dir, 2, tmp_path / "prefixes")


def _tgis_prefix_scenario(rank: int, world_size: int, port: int, model_dir: str, store: str, ids: list[int]):
    driver = StepDriver(native_engine(rank, world_size, port, model_dir, prefix_store_path=Path(store)))
    driver.join(request(0, ids, NEW_TOKENS, prefix_id="both"))
    driver.run_until(NEW_TOKENS)
    return driver.outputs[0]


def test_tgis_encoder_and_decoder_prefix_files_on_two_ranks_equal_transformers(tmp_path):
    model_dir = build_tiny_seq2seq_lm(tmp_path / "t5", arch="t5")
    weight = AutoModelForSeq2SeqLM.from_pretrained(model_dir).get_input_embeddings().weight
    generator = torch.Generator().manual_seed(7)
    encoder, decoder = (torch.randn(n, weight.shape[1], generator=generator) * weight.std().item() for n in (4, 3))
    (tmp_path / "prefixes" / "both").mkdir(parents=True)
    torch.save(encoder, tmp_path / "prefixes" / "both" / "encoder.pt")
    torch.save(decoder, tmp_path / "prefixes" / "both" / "decoder.pt")
    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPTS[0]).input_ids
    outputs = run_ranks(_tgis_prefix_scenario, 2, str(model_dir), str(tmp_path / "prefixes"), ids)
    expected = reference_greedy_with_prefix(model_dir, encoder, ids, NEW_TOKENS, decoder_prefix=decoder)
    assert outputs[0][: len(expected)] == expected
    assert outputs[0] == outputs[1]
