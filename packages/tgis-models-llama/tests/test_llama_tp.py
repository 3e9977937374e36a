"""LLaMA on tgis_native, 1 and 2 ranks (gloo), against plain transformers on the same weights:
same greedy tokens, close logprobs, requests joining and leaving mid-generation, 1/N weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support.engines import decode_steps, native_engine, request
from tests.support.ranks import run_ranks
from tests.support.tiny_models import build_tiny_causal_lm, reference_greedy
from tgis_proto import shard_pb2 as pb

PROMPTS = ["Hello there, general", "A", "The quick brown fox jumps over the lazy dog and then"]
NEW_TOKENS = 8
LOGPROB_TOLERANCE = 1e-4  # float32 on CPU; the sharded sums only reorder additions

CONFIGS = {
    "gqa": {},
    "mha": {"num_key_value_heads": 4},
    # One KV head for two ranks: it is replicated; tied embeddings double as the LM head.
    "mqa-tied": {"num_key_value_heads": 1, "tie_word_embeddings": True},
    "llama3-rope": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    },
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch="llama", **CONFIGS[request.param])


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_greedy(model_dir, PROMPTS, NEW_TOKENS)


@pytest.fixture(scope="module")
def reference_logprobs(model_dir, prompt_ids):
    """log_softmax of the reference model's next-token scores after each whole prompt."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1) for ids in prompt_ids]


def _scenario(rank: int, world_size: int, port: int, model_dir: str, prompt_ids: list[list[int]]) -> dict:
    """Request 0 runs alone, 1 and 2 join after two steps, 2 leaves after two more."""
    engine = native_engine(rank, world_size, port, model_dir)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    details = {"logprobs": True, "ranks": True, "top_n": 2}
    tokens, running = engine.prefill(pb.Batch(id=1, requests=[request(0, prompt_ids[0], NEW_TOKENS, **details)]))
    first = {t.request_id: t for t in tokens}
    outputs = {t.request_id: [t.token_id] for t in tokens}
    decode_steps(engine, running, outputs, 2)
    joiners = [request(i, prompt_ids[i], NEW_TOKENS, **details) for i in (1, 2)]
    tokens, joining = engine.prefill(pb.Batch(id=2, requests=joiners))
    first.update({t.request_id: t for t in tokens})
    outputs.update({t.request_id: [t.token_id] for t in tokens})
    running = engine.concatenate([running, joining])
    decode_steps(engine, running, outputs, 2)
    free_before = engine.allocator.free_blocks
    running = running.filter([0, 1])
    freed = engine.allocator.free_blocks - free_before
    decode_steps(engine, running, outputs, NEW_TOKENS)
    return {
        "outputs": outputs,
        "first_logprobs": {rid: t.logprob for rid, t in first.items()},
        "first_ranks": {rid: t.rank for rid, t in first.items()},
        "weight_bytes": weight_bytes,
        "freed_blocks": freed,
    }


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_llama_equals_transformers(model_dir, prompt_ids, expected, reference_logprobs, world_size):
    results = run_ranks(_scenario, world_size, str(model_dir), prompt_ids)
    result = results[0]
    for i in (0, 1):
        assert result["outputs"][i][: len(expected[i])] == expected[i]
    assert result["outputs"][2] == expected[2][:3]
    for i, reference in enumerate(reference_logprobs):
        token = expected[i][0]
        assert result["first_logprobs"][i] == pytest.approx(float(reference[token]), abs=LOGPROB_TOLERANCE)
        assert result["first_ranks"][i] == 1
    assert result["freed_blocks"] > 0  # the leaving request's blocks went back to the pool
    # Every rank followed the same tokens.
    assert all(r["outputs"] == result["outputs"] for r in results)


def test_each_rank_holds_about_half_the_weights(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    full = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    (single,) = run_ranks(_weights_only, 1, str(model_dir))
    halves = run_ranks(_weights_only, 2, str(model_dir))
    assert single == pytest.approx(full, rel=0.01)
    for half in halves:
        # Norms are replicated on every rank: a little over half.
        assert 0.5 * full < half < 0.55 * full


def _weights_only(rank: int, world_size: int, port: int, model_dir: str) -> int:
    engine = native_engine(rank, world_size, port, model_dir)
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def test_unknown_model_type_names_the_installed_plugins(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(Exception, match=r"no plugin serves model_type 'gpt2'.*llama \(llama\)"):
        native_engine(0, 1, 0, model_dir)
