"""Falcon on tgis_native on one GPU and over NCCL on two, fp16/bf16, against transformers on one GPU.

Skips without CUDA devices; run on the accelerator (bench/gpu_checks.sh).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.native_checks import GPU_BACKENDS, GPU_COUNTS, check_gpus_match_transformers
from tests.support.tiny_models import build_tiny_causal_lm

# Heads of 128, as the GPU checks' LLaMA (tests.support.native_checks.GPU_LLAMA_SHAPE).
SHAPE = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
CONFIGS = {
    # Grouped KV heads with rotary positions: flash-attn's GQA path where it is installed.
    "falcon-40b": {**SHAPE, "new_decoder_architecture": True, "num_kv_heads": 2},
    # ALiBi: the attention backends' slope bias instead of rotary.
    "falcon-rw": {**SHAPE, "multi_query": False, "parallel_attn": False, "alibi": True, "bias": True},
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_dir(request, tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp(request.param), arch="falcon", **CONFIGS[request.param])


@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_falcon_on_gpus_matches_transformers(model_dir, dtype, gpus, backend, request):
    if backend == "flashinfer" and CONFIGS[request.node.callspec.params["model_dir"]].get("alibi"):
        pytest.skip("FlashInfer serves no ALiBi: FlexAttention does")
    check_gpus_match_transformers(model_dir, dtype, gpus, backend=backend)
