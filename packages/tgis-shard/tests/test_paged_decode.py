"""The decode kernel over the paged cache (``layers.paged_decode``) against the torch backend in
float64: GQA and multi-head layouts, head sizes, block sizes, sequences cut into parts or not,
and the kernel replayed from a CUDA graph captured over padding rows, as a decode graph runs it."""

from __future__ import annotations

import random

import pytest
import torch

from tgis_shard.engines.cuda_graphs import DecodeGraphs, graph_buckets
from tgis_shard.layers import paged_decode
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache, blocks_for, paged_attention

needs_triton_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or paged_decode.triton is None, reason="needs CUDA and Triton"
)
MIXED = [1, 15, 16, 17, 64, 200, 333, 1000]
# The output's rounding (one unit in the last place: 2^-8 relative in bf16, 2^-11 in fp16) and the
# probabilities' rounding to the cache's dtype before the product with the values, as FlashInfer's.
TOLERANCE = {torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2}, torch.float16: {"rtol": 2e-3, "atol": 2e-3}}


def _step(contexts: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """A cache holding random keys and values, the decode step's metadata (blocks shuffled, as a
    serving cache hands them out after a while) and its queries; the last block is spare."""
    pages = [blocks_for(c, block_size) for c in contexts]
    blocks = list(range(sum(pages)))
    random.Random(len(contexts)).shuffle(blocks)
    tables = [blocks[sum(pages[:i]) : sum(pages[: i + 1])] for i in range(len(contexts))]
    cache = PagedKVCache(1, len(blocks) + 1, block_size, kv_heads, head_dim, dtype, "cuda")
    generator = torch.Generator(device="cuda").manual_seed(len(contexts) * head_dim)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator, device="cuda"))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator, device="cuda"))
    meta = AttentionMetadata.build([1] * len(contexts), contexts, tables, block_size, "cuda")
    query = torch.randn(len(contexts), heads, head_dim, generator=generator, device="cuda").to(dtype)
    return cache, meta, query


def _reference(cache: PagedKVCache, meta: AttentionMetadata, query: torch.Tensor, scale: float) -> torch.Tensor:
    """The torch backend's attention over float64 copies of the cache and queries."""
    layout = (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim)
    exact = PagedKVCache(1, *layout, torch.float64, "cuda")
    exact.keys[0].copy_(cache.keys[0])
    exact.values[0].copy_(cache.values[0])
    return paged_attention(query.double(), exact, 0, meta, scale, backend="torch")


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(32, 8, 128, 16), (8, 8, 64, 16), (16, 2, 128, 128), (12, 4, 80, 16), (64, 8, 256, 16)],
    ids=["gqa-4", "mha", "gqa-8-block-128", "head-80", "head-256"],
)
@pytest.mark.parametrize("splits", [None, 1, 3, paged_decode.MAX_SPLITS], ids=lambda s: f"splits-{s}")
def test_the_kernel_equals_the_torch_backend(heads, kv_heads, head_dim, block_size, dtype, splits):
    cache, meta, query = _step(MIXED, heads, kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    keys, values = cache.keys[0], cache.values[0]
    out = paged_decode.attend(query, keys, values, meta.block_tables, meta.context_lens, scale, splits)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), _reference(cache, meta, query, scale), **TOLERANCE[dtype])


@needs_triton_gpu
@pytest.mark.parametrize(
    "contexts", [MIXED, [4096], [2048, 2048, 5000, 1, 17, 8000, 100, 3000]], ids=["mixed", "one-long", "long-batch"]
)
def test_replayed_from_a_graph_captured_over_padding_it_attends_the_steps_contexts(contexts: list[int]) -> None:
    """The graph is captured over padding rows (one token each in the spare block) with the block
    tables at full width; the step's metadata is then copied into the same buffers and the graph
    replayed, as the engine replays a decode graph."""
    heads, kv_heads, head_dim, block_size = 32, 8, 128, 16
    cache, meta, query = _step(contexts, heads, kv_heads, head_dim, block_size, torch.bfloat16)
    rows, spare = len(contexts), cache.num_blocks - 1
    width = meta.block_tables.shape[1]
    tables = torch.full((rows, width), spare, dtype=torch.int32, device="cuda")
    lengths = torch.ones(rows, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5
    # Captured by the engine's own capture (its warm runs compile the kernel outside the graph).
    graphs = DecodeGraphs.capture(
        lambda _rows: paged_decode.attend(query, cache.keys[0], cache.values[0], tables, lengths, scale),
        [rows],
        query.device,
    )

    tables.copy_(meta.block_tables)
    lengths.copy_(meta.context_lens)
    out = graphs.replay(rows)
    torch.testing.assert_close(out.double(), _reference(cache, meta, query, scale), **TOLERANCE[torch.bfloat16])


def test_sequences_are_cut_into_parts_only_where_rows_cannot_fill_the_device() -> None:
    sms, kv_heads = 132, 8
    assert paged_decode.splits_for(1, kv_heads, sms) == paged_decode.MAX_SPLITS
    assert paged_decode.splits_for(8, kv_heads, sms) == 8  # 264 programs wanted over 64 pairs: 5, rounded up
    assert paged_decode.splits_for(24, kv_heads, sms) == 2
    assert paged_decode.splits_for(33, kv_heads, sms) == 1
    assert paged_decode.splits_for(128, kv_heads, sms) == 1


@pytest.mark.parametrize("max_batch_size", [1, 3, 8, 20, 128, 4096])
@pytest.mark.parametrize(("kv_heads", "sms"), [(8, 132), (1, 132), (4, 114), (32, 108)])
def test_every_part_count_a_step_can_ask_for_is_compiled_by_the_graphs_captured_at_start(
    max_batch_size, kv_heads, sms
) -> None:
    """The part count is a compile-time constant: a count no decode graph's bucket compiled would
    be compiled inside a request's step (a mixed step's leading decodes come in any number)."""
    captured = {paged_decode.splits_for(rows, kv_heads, sms) for rows in graph_buckets(max_batch_size)}
    asked = {paged_decode.splits_for(rows, kv_heads, sms) for rows in range(1, max_batch_size + 1)}
    assert asked <= captured


@pytest.mark.parametrize("max_rows", [1, 5, 40, 4096])
def test_the_warm_up_rows_reach_every_part_count_once(max_rows) -> None:
    sms, kv_heads = 132, 8
    rows = paged_decode.rows_for_each_part_count(max_rows, kv_heads, sms)
    counts = [paged_decode.splits_for(n, kv_heads, sms) for n in rows]
    assert len(set(counts)) == len(counts)
    assert set(counts) == {paged_decode.splits_for(n, kv_heads, sms) for n in range(1, max_rows + 1)}


def test_the_kernel_serves_half_precision_caches_on_a_gpu_only() -> None:
    assert not paged_decode.serves("cpu", torch.bfloat16)
    assert not paged_decode.serves("cuda", torch.float32)
    assert paged_decode.serves("cuda", torch.float16) == (paged_decode.triton is not None)
