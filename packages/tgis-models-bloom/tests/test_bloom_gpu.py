"""BLOOM on tgis_native on one GPU and over NCCL on two, fp16/bf16, against transformers on one GPU.

Skips without CUDA devices; run on the accelerator (bench/gpu_checks.sh).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.native_checks import GPU_COUNTS, check_gpus_match_transformers
from tests.support.tiny_models import build_tiny_causal_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 12 heads, 6 a rank: rank 1's slopes include those past the largest power of two.
    shape = {"hidden_size": 384, "n_layer": 4, "n_head": 12}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("bloom-gpu"), arch="bloom", **shape)


@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_bloom_on_gpus_matches_transformers(model_dir, dtype, gpus):
    check_gpus_match_transformers(model_dir, dtype, gpus)
