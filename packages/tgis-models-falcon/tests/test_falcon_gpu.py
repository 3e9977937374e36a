"""Falcon on tgis_native over NCCL on 2 GPUs, fp16/bf16, against transformers on the same GPU.

Skips without 2 CUDA devices; run on the accelerator (see bench/RESULTS.md for the command).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.native_checks import check_two_gpus_match_transformers
from tests.support.tiny_models import build_tiny_causal_lm

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


SHAPE = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8}
CONFIGS = {
    # Grouped KV heads with rotary positions: flash-attn's GQA path where it is installed.
    "falcon-40b": {**SHAPE, "new_decoder_architecture": True, "num_kv_heads": 2},
    # ALiBi: the attention backends' slope bias instead of rotary.
    "falcon-rw": {**SHAPE, "multi_query": False, "parallel_attn": False, "alibi": True, "bias": True},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch="falcon", **CONFIGS[request.param])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_two_gpu_nccl_falcon_matches_transformers(model_dir, dtype):
    check_two_gpus_match_transformers(model_dir, dtype)
