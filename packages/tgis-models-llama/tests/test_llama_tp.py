"""LLaMA on tgis_native, 1 and 2 ranks (gloo), against plain transformers on the same weights:
same greedy tokens, close logprobs, requests joining and leaving mid-generation, 1/N weights."""

from __future__ import annotations

import pytest
import torch

from tests.support.engines import check_one_batch_equals_reference, native_engine
from tests.support.native_checks import (
    check_each_rank_holds_about_half,
    check_prefixes_equal_transformers,
    check_ranks_agree_on_the_smallest_cache,
    check_sharded_equals_transformers,
)
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard.engines.tgis_native import NativeEngine
from tgis_shard.prefixes import PrefixesUnsupportedError

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


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_llama_equals_transformers(model_dir, world_size):
    check_sharded_equals_transformers(model_dir, world_size)


@pytest.mark.parametrize("world_size", [1, 2])
def test_chunked_prefill_equals_transformers(tmp_path, world_size):
    # Prompts of 1, 5 and 12 tokens in chunks of at most 3, beside other requests' decodes.
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    check_sharded_equals_transformers(model_dir, world_size, chunk=3)


def test_flex_attention_engine_equals_transformers_after_its_warm_up(tmp_path):
    # FlexAttention runs eagerly on a CPU: the GPU's compiled kernel sees the same masks.
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    check_sharded_equals_transformers(model_dir, 2, attention_backend="flex")


def test_ranks_sized_for_different_caches_all_take_the_smallest(tmp_path):
    check_ranks_agree_on_the_smallest_cache(build_tiny_causal_lm(tmp_path / "llama", arch="llama"))


def test_each_rank_holds_about_half_the_weights(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    check_each_rank_holds_about_half(model_dir)


def test_unknown_model_type_names_the_installed_plugins(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "gpt2", arch="gpt2")
    with pytest.raises(Exception, match=r"no plugin serves model_type 'gpt2'.*llama \(llama\)"):
        native_engine(0, 1, 0, model_dir)


def test_prompt_prefixes_on_two_ranks_equal_transformers(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama")
    check_prefixes_equal_transformers(model_dir, 2, tmp_path / "prefixes")


class _PluginWithoutOverrides(torch.nn.Module):
    """A third-party family that does not declare SupportsPromptPrefixes."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.num_layers, self.num_kv_heads, self.head_dim = inner.num_layers, inner.num_kv_heads, inner.head_dim

    def forward(self, input_ids, positions, cache, meta):
        return self.inner(input_ids, positions, cache, meta)

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)


def test_a_family_without_embedding_overrides_refuses_prefixes_and_still_serves(model_dir, prompt_ids, expected):
    real = native_engine(0, 1, 0, model_dir)
    plugin = _PluginWithoutOverrides(real.model)
    engine = NativeEngine(plugin, real.ctx, real.tp, real.config, real.cache, real.eos_token_ids)
    with pytest.raises(PrefixesUnsupportedError, match="the llama model plugin does not support prompt prefixes"):
        engine.prompt_prefix("tuned")
    check_one_batch_equals_reference(engine, prompt_ids, expected)
