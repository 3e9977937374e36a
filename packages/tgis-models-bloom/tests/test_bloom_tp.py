"""BLOOM on tgis_native, 1 and 2 ranks (gloo), against plain transformers on the same weights:
same greedy tokens, close logprobs, requests joining and leaving mid-generation, 1/N weights."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.support.native_checks import (
    check_each_rank_holds_about_half,
    check_prefixes_equal_transformers,
    check_sharded_equals_transformers,
)
from tests.support.tiny_models import build_tiny_causal_lm

CONFIGS = {
    "4-heads": {},
    "8-heads-post-norm-residual": {"n_head": 8, "apply_residual_connection_post_layernorm": True},
    # 6 heads: the slopes past the largest power of two, and on rank 1 of 2; names as bigscience
    # publishes them, without the "transformer." prefix.
    "6-heads-unprefixed": {"n_head": 6, "hidden_size": 48},
}


def _drop_transformer_prefix(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    save_file({name.removeprefix("transformer."): t for name, t in tensors.items()}, path, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    model_dir = build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch="bloom", **CONFIGS[request.param])
    if request.param.endswith("unprefixed"):
        _drop_transformer_prefix(model_dir)
    return model_dir


@pytest.mark.parametrize("world_size", [1, 2])
def test_sharded_bloom_equals_transformers(model_dir, world_size):
    check_sharded_equals_transformers(model_dir, world_size)


def test_each_rank_holds_about_half_the_weights(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "bloom", arch="bloom")
    check_each_rank_holds_about_half(model_dir)


def test_prompt_prefixes_on_two_ranks_equal_transformers(tmp_path):
    model_dir = build_tiny_causal_lm(tmp_path / "bloom", arch="bloom")
    check_prefixes_equal_transformers(model_dir, 2, tmp_path / "prefixes")
