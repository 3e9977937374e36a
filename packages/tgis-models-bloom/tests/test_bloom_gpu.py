"""BLOOM on tgis_native over NCCL on 2 GPUs, fp16/bf16, against transformers on the same GPU.

Skips without 2 CUDA devices; run on the accelerator (see bench/RESULTS.md for the command).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.native_checks import check_two_gpus_match_transformers
from tests.support.tiny_models import build_tiny_causal_lm

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 12 heads, 6 a rank: rank 1's slopes include those past the largest power of two.
    shape = {"hidden_size": 384, "n_layer": 4, "n_head": 12}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("bloom-gpu"), arch="bloom", **shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_two_gpu_nccl_bloom_matches_transformers(model_dir, dtype):
    check_two_gpus_match_transformers(model_dir, dtype)
