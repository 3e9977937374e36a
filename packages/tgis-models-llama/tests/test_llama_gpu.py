"""LLaMA on tgis_native over NCCL on 2 GPUs, fp16/bf16, against transformers on the same GPU.

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
    shape = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2}
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama-gpu"), arch="llama", **shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_two_gpu_nccl_llama_matches_transformers(model_dir, dtype):
    check_two_gpus_match_transformers(model_dir, dtype)


def test_two_gpu_nccl_llama_prompt_prefixes_match_transformers(model_dir, tmp_path):
    check_two_gpus_match_transformers(model_dir, torch.bfloat16, prefix_store=tmp_path)
