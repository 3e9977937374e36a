"""The measured memory model of the padded engine on a GPU: a decode step of a batch shaped
unlike the measuring one stays within the bytes per cached token it reports."""

from __future__ import annotations

import pytest
import torch

from tests.support.tiny_models import build_tiny_causal_lm
from tgis_shard import memory
from tgis_shard.engines.base import ShardContext
from tgis_shard.engines.hf_transformers import create_engine
from tgis_shard.registry import shard_registry

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Grouped-query attention: masked SDPA expands the 2 KV heads to 8 during decode.
SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
}


def test_decode_of_another_batch_shape_stays_within_the_reported_bytes_per_token(tmp_path) -> None:
    model_dir = build_tiny_causal_lm(tmp_path / "llama", arch="llama", **SHAPE)
    device = torch.device("cuda:0")
    ctx = ShardContext(
        model_dir=model_dir,
        model_type="llama",
        dtype=torch.bfloat16,
        device=device,
        rank=0,
        world_size=1,
        max_sequence_length=1024,
        registry=shard_registry(None),
        max_batch_size=16,
        hf_paged=False,  # the padded engine's memory model
    )
    engine = create_engine(ctx)
    model = engine.memory_model()
    assert model.measured
    assert model.bytes_per_token >= memory.config_kv_bytes_per_token(engine.model.config, torch.bfloat16)
    # The router counts each row's room beside its tokens (kv_cache.RoomyLayer).
    assert model.cache_room_tokens == engine.cache_room_tokens > 0
    # Fewer, longer rows than the measuring batch (8 × 256).
    peak_per_token = memory.measured_decode_bytes_per_token(
        device, engine.measure_decode, 3, 700, model.cache_room_tokens
    )
    print(f"reported {model.bytes_per_token:.0f} B/token, decode of 3 × 700 peaked at {peak_per_token:.0f}")
    assert peak_per_token <= model.bytes_per_token


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_free_memory_stays_within_cuda_process_memory_fraction() -> None:
    device = torch.device("cuda", 0)
    _, total = torch.cuda.mem_get_info(device)
    try:
        memory.limit_process_memory(0.25, device)
        assert memory.device_free_bytes(device) <= 0.25 * total
    finally:
        memory.limit_process_memory(1.0, device)
    assert memory.device_free_bytes(device) > 0.25 * total  # the share is lifted again (a test GPU is mostly free)
