"""Falcon on tgis_native, 1 and 2 ranks (gloo), against plain transformers on the same weights:
same greedy tokens, close logprobs, requests joining and leaving mid-generation, 1/N weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import FalconConfig, PretrainedConfig

from tests.support.engines import StepDriver, native_engine, request
from tests.support.native_checks import (
    check_each_rank_holds_about_half,
    check_prefixes_equal_transformers,
    check_sharded_equals_transformers,
)
from tests.support.tiny_models import build_tiny_causal_lm
from tgis_models_falcon.model import FalconLayout

CONFIGS = {
    # One KV head for two ranks: it is replicated, each rank keeping half the query heads.
    "falcon-7b": {"multi_query": True, "parallel_attn": True, "new_decoder_architecture": False},
    # Two KV groups of two query heads; ln_attn and ln_mlp; an untied LM head.
    "falcon-40b": {
        "new_decoder_architecture": True,
        "num_attention_heads": 4,
        "num_kv_heads": 2,
        "tie_word_embeddings": False,
    },
    # Parallel blocks with biases: attention and MLP shares are reduced once, each bias added once.
    "falcon-7b-bias": {"multi_query": True, "parallel_attn": True, "new_decoder_architecture": False, "bias": True},
    # New decoder with one shared LayerNorm (num_ln_in_parallel_attn=1) and a single KV group.
    "falcon2-11b": {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 1, "num_kv_heads": 1},
    # Per-head [q, k, v] groups, sequential blocks, ALiBi instead of rotary, biases everywhere.
    "falcon-rw": {"multi_query": False, "parallel_attn": False, "alibi": True, "bias": True},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    model_dir = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch="falcon", **CONFIGS[request.param])
    _randomise_biases(model_dir / "model.safetensors")
    return model_dir


def _randomise_biases(path: Path) -> None:
    """The tiny models start with zero biases, which would hide a bias read from the wrong place."""
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if name.endswith(".bias"):
            tensors[name] = 0.1 * torch.randn(tensor.shape, generator=generator)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_falcon_equals_transformers(model_dir, world_size):
    check_sharded_equals_transformers(model_dir, world_size)


@pytest.mark.parametrize(("config", "per_layer"), [("falcon-40b", 1), ("falcon-rw", 2)], ids=["parallel", "sequential"])
def test_parallel_blocks_all_reduce_once_per_layer(tmp_path, monkeypatch, config, per_layer):
    model_dir = build_tiny_causal_lm(tmp_path / "falcon", arch="falcon", **CONFIGS[config])
    engine = native_engine(0, 1, 0, model_dir)
    reduced = []
    all_reduce = type(engine.tp).all_reduce
    monkeypatch.setattr(type(engine.tp), "all_reduce", lambda tp, x: reduced.append(x.shape) or all_reduce(tp, x))
    driver = StepDriver(engine)
    driver.join(request(0, [5, 6, 7], 2))
    driver.step()
    # On one rank the embedding looks its rows up whole: every reduce is a block's.
    assert len(reduced) == engine.model.num_layers * per_layer


def test_each_rank_holds_about_half_the_weights(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "falcon", arch="falcon", **CONFIGS["falcon-40b"])
    check_each_rank_holds_about_half(model_dir)


def test_refinedweb_config_spellings_mean_the_new_decoder():
    # Falcon-40B's config.json before transformers took Falcon in.
    config = PretrainedConfig(n_head=128, n_head_kv=8, n_layer=60, hidden_size=8192, parallel_attn=True)
    config.model_type = "RefinedWeb"
    layout = FalconLayout.from_config(config)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.num_layers) == (128, 8, 64, 60)
    assert layout.parallel
    assert layout.two_norms
    assert not layout.alibi


def test_multi_query_ignores_the_num_kv_heads_transformers_fills_in():
    config = FalconConfig(num_attention_heads=4, hidden_size=64, multi_query=True)
    assert config.num_kv_heads == 4  # transformers' default, meaningless for the old decoder
    assert FalconLayout.from_config(config).num_kv_heads == 1


@pytest.mark.parametrize("config", ["falcon-40b", "falcon-rw"])
def test_prompt_prefixes_on_two_ranks_equal_transformers(tmp_path, config):
    model_dir = build_tiny_causal_lm(tmp_path / "falcon", arch="falcon", **CONFIGS[config])
    check_prefixes_equal_transformers(model_dir, 2, tmp_path / "prefixes")
