"""The cache write of a layer (``PagedKVCache.store`` / ``rotate_and_store``): on a GPU one Triton
kernel, which must leave the same bits in the cache and return the same rotated queries as the
plain ops (``fused.rotate``'s eager definition and ``index_copy_``) for every dtype and head
size, with q, k and v as the strided views a layer's QKV split makes; elsewhere the plain ops."""

from __future__ import annotations

import pytest
import torch

from tgis_shard.layers import fused, kv_write
from tgis_shard.layers.paged_attention import PagedKVCache

HEADS, KV_HEADS, BLOCKS, BLOCK_SIZE = 4, 2, 64, 4
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _step(tokens: int, head_dim: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(tokens * head_dim)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([HEADS * head_dim, KV_HEADS * head_dim, KV_HEADS * head_dim], dim=-1)
    angles = torch.rand(tokens, head_dim // 2, generator=g) * 2000  # positions up to ~2,000
    table = torch.cat((angles, angles), dim=-1)
    rotary = (table.cos().to(device, dtype), table.sin().to(device, dtype))
    slots = torch.randperm(BLOCKS * BLOCK_SIZE, generator=g)[:tokens].to(device)
    views = (q.view(tokens, HEADS, head_dim), k.view(tokens, KV_HEADS, head_dim), v.view(tokens, KV_HEADS, head_dim))
    return (*views, rotary, slots)


def _cache(head_dim: int, dtype: torch.dtype, device: str) -> PagedKVCache:
    return PagedKVCache(1, BLOCKS, BLOCK_SIZE, KV_HEADS, head_dim, dtype, device)


def _plain(q, k, v, rotary, slots, cache: PagedKVCache) -> torch.Tensor:
    """What the kernel replaces: the eager rotation, then one index_copy_ each for keys and values."""
    if rotary is not None:
        q, k = fused.rotate.fn(q, k, *rotary)
    flat = (-1, cache.num_kv_heads, cache.head_dim)
    cache.keys[0].view(flat).index_copy_(0, slots, k)
    cache.values[0].view(flat).index_copy_(0, slots, v)
    return q


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("tokens", [1, 13, 32, 200])  # 200: programs of several heads
def test_the_gpu_kernel_writes_the_bits_of_the_plain_ops(tokens, head_dim, dtype):
    q, k, v, rotary, slots = _step(tokens, head_dim, dtype, "cuda")
    assert kv_write.applies(k, v, q, cos=rotary[0])
    expected, got = _cache(head_dim, dtype, "cuda"), _cache(head_dim, dtype, "cuda")
    want = _plain(q, k, v, rotary, slots, expected)
    have = got.rotate_and_store(0, q, k, v, rotary, slots)
    assert torch.equal(have, want)
    assert torch.equal(got.keys[0], expected.keys[0])
    assert torch.equal(got.values[0], expected.values[0])

    # Into a buffer (a step captured in pieces hands the queries over in one): the same bits.
    buffer = torch.zeros(tokens + 3, *q.shape[1:], dtype=dtype, device="cuda")
    into = _cache(head_dim, dtype, "cuda")
    assert into.rotate_and_store(0, q, k, v, rotary, slots, buffer[:tokens]).data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer[:tokens], want)
    assert buffer[tokens:].count_nonzero() == 0
    assert torch.equal(into.keys[0], expected.keys[0])

    unrotated, plain = _cache(head_dim, dtype, "cuda"), _cache(head_dim, dtype, "cuda")
    _plain(q, k, v, None, slots, plain)
    unrotated.store(0, k, v, slots)
    assert torch.equal(unrotated.keys[0], plain.keys[0])
    assert torch.equal(unrotated.values[0], plain.values[0])
    assert unrotated.keys[0].count_nonzero() > 0


@needs_cuda
def test_turned_off_the_gpu_write_runs_the_plain_ops():
    q, k, v, rotary, _slots = _step(3, 64, torch.bfloat16, "cuda")
    fused.enable(False)
    try:
        assert not kv_write.applies(k, v, q, cos=rotary[0])
    finally:
        fused.enable(True)


def test_on_a_cpu_the_write_rotates_and_stores_with_the_plain_ops():
    q, k, v, rotary, slots = _step(5, 64, torch.bfloat16, "cpu")
    assert not kv_write.applies(k, v, q, cos=rotary[0])
    expected, got = _cache(64, torch.bfloat16, "cpu"), _cache(64, torch.bfloat16, "cpu")
    want = _plain(q, k, v, rotary, slots, expected)
    have = got.rotate_and_store(0, q, k, v, rotary, slots)
    assert torch.equal(have, want)
    assert not torch.equal(have, q)
    assert torch.equal(got.keys[0], expected.keys[0])
    assert torch.equal(got.values[0], expected.values[0])
    buffer = torch.zeros_like(q)
    assert got.rotate_and_store(0, q, k, v, rotary, slots, buffer) is buffer
    assert torch.equal(buffer, want)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_the_rotated_queries_buffer_must_fit_the_queries(device):
    q, k, v, rotary, slots = _step(3, 64, torch.bfloat16, device)
    cache = _cache(64, torch.bfloat16, device)
    strided = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=device).transpose(0, 1)
    for wrong in (torch.empty_like(q)[:2], torch.empty_like(q)[:1], strided):
        with pytest.raises(ValueError, match="contiguous, of the queries' shape"):
            cache.rotate_and_store(0, q, k, v, rotary, slots, wrong)
