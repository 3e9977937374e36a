"""Memory models: KV bytes per token, the synthesised CPU model, the prefill fit."""

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, T5Config

from tests.support.engines import cpu_context
from tgis_shard import memory


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert memory.kv_bytes_per_token(32, 8, 128, torch.bfloat16) == 2 * 32 * 8 * 128 * 2


def test_config_kv_bytes_use_kv_heads_and_cross_attention_for_seq2seq():
    llama = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    assert memory.config_kv_bytes_per_token(llama, torch.float32) == 2 * 3 * 2 * 16 * 4
    t5 = T5Config(d_model=64, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=3)
    assert memory.config_kv_bytes_per_token(t5, torch.float32) == 2 * (2 * 3 * 4 * 16 * 4)


def test_decode_bytes_add_the_larger_of_cache_growth_and_grouped_head_expansion_of_one_layer():
    # 32 query heads over 8 KV heads: repeat_kv makes 4 copies of a layer's keys and values.
    gqa = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32)
    kv = memory.config_kv_bytes_per_token(gqa, torch.bfloat16)
    assert memory.config_decode_bytes_per_token(gqa, torch.bfloat16) == pytest.approx(kv * (1 + 4 / 32))
    # Without grouping nothing is expanded: growing the cache (one layer) is the transient.
    mha = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)
    kv = memory.config_kv_bytes_per_token(mha, torch.float32)
    assert memory.config_decode_bytes_per_token(mha, torch.float32) == pytest.approx(kv * 1.5)


def test_synthesised_model_fits_max_batch_of_max_length_requests():
    settings = memory.MemorySettings(max_batch_size=12, max_sequence_length=2048)
    model = memory.synthesised(settings, bytes_per_token=100.0)
    assert model.limit_bytes == 12 * 2048 * 100.0
    assert not model.measured


@pytest.mark.parametrize(("linear", "quadratic"), [(1000.0, 0.0), (1000.0, 2.5), (0.0, 10.0)])
def test_prefill_fit_recovers_linear_and_quadratic_terms(linear, quadratic):
    def peak(n: int) -> float:
        return linear * n + quadratic * n * n

    assert memory.fit_prefill(512, peak(512), 1024, peak(1024)) == pytest.approx((linear, quadratic))


def test_prefill_fit_never_goes_negative():
    assert memory.fit_prefill(512, 600_000.0, 1024, 1_000_000.0) == (pytest.approx(1_000_000.0 / 1024), 0.0)


def test_cuda_allocator_defaults_to_expandable_segments():
    environ: dict[str, str] = {}
    memory.configure_cuda_allocator(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.parametrize("name", memory.ALLOCATOR_ENV_NAMES)
def test_cuda_allocator_setting_of_the_operator_is_kept(name):
    environ = {name: "max_split_size_mb:512"}
    memory.configure_cuda_allocator(environ)
    assert environ == {name: "max_split_size_mb:512"}


def test_usable_memory_keeps_the_prefix_cache_out_then_the_safety_margin():
    settings = memory.MemorySettings(safety_margin_percent=20, reserved_bytes=2 * 2**30)
    assert memory.usable_bytes(12 * 2**30, settings) == pytest.approx(8 * 2**30)
    assert memory.usable_bytes(2**30, settings) == 0.0  # never negative


def test_a_configured_prefix_store_reserves_prompt_cache_size_mb(tmp_path):
    ctx = cpu_context(tmp_path, prompt_cache_size_mb=64)
    assert ctx.memory_settings.reserved_bytes == 0  # no PREFIX_STORE_PATH: nothing to cache
    assert replace(ctx, prefix_store_path=tmp_path).memory_settings.reserved_bytes == 64 * 2**20


def test_a_batch_too_large_to_sample_refuses_to_start_saying_what_to_lower(tmp_path, monkeypatch):
    from tgis_shard.engines import tgis_native
    from tgis_shard.engines.base import UnsupportedModelError

    def out_of_memory(*args: object) -> int:
        raise torch.OutOfMemoryError("CUDA out of memory")

    # The cache of a GPU is sized from what sampling leaves; measuring it is the first device work.
    monkeypatch.setattr(tgis_native, "sampling_peak_bytes", out_of_memory)
    ctx = cpu_context(tmp_path, device=torch.device("cuda", 0), max_batch_size=4096)
    with pytest.raises(UnsupportedModelError, match="MAX_BATCH_SIZE 4096 rows of a 128256-token vocabulary"):
        tgis_native._cache_blocks(ctx, model=None, block_size=16, vocab_size=128256)
