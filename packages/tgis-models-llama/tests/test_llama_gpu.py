"""LLaMA on tgis_native on one GPU and over NCCL on two, fp16/bf16, against transformers on one GPU.

Skips without CUDA devices; run on the accelerator (bench/gpu_checks.sh).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.native_checks import GPU_BACKENDS, GPU_COUNTS, GPU_LLAMA_SHAPE, check_gpus_match_transformers
from tests.support.tiny_models import build_tiny_causal_lm


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("llama-gpu"), arch="llama", **GPU_LLAMA_SHAPE)


@pytest.mark.parametrize("gpus", GPU_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_llama_on_gpus_matches_transformers(model_dir, dtype, gpus, backend):
    check_gpus_match_transformers(model_dir, dtype, gpus, backend=backend)


@pytest.mark.parametrize("gpus", GPU_COUNTS)
def test_llama_prompt_prefixes_on_gpus_match_transformers(model_dir, tmp_path, gpus):
    check_gpus_match_transformers(model_dir, torch.bfloat16, gpus, prefix_store=tmp_path)
