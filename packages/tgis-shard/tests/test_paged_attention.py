"""Paged attention over a block cache against plain per-sequence causal attention in float64,
through prefill, decode, mixed steps, GQA/MQA, ALiBi, sliding windows and block reuse."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from tgis_shard.engines.cuda_graphs import DecodeGraphs
from tgis_shard.layers import flex_paged
from tgis_shard.layers import paged_attention as paged_attention_module
from tgis_shard.layers.flashinfer_paged import (
    WORKSPACE_BYTES,
    decode_graph_workspace_bytes,
    flashinfer_available,
    leading_decodes,
    pages_of,
    split_pages,
)
from tgis_shard.layers.paged_attention import (
    BLOCK_SIZES,
    AttentionMetadata,
    PagedKVCache,
    _flash_attn,
    _flex_available,
    blocks_for,
    choose_backend,
    paged_attention,
    plan_attention,
)

HEAD_DIM = 16
NUM_LAYERS = 2
# FlexAttention runs eagerly on CPU: the same masks as its compiled GPU kernel, scored densely.
CPU_BACKENDS = pytest.mark.parametrize("backend", ["torch", "flex"])
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")


def reference_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One sequence: its last ``len(query)`` tokens attend its contiguous ``keys``, in float64."""
    query, keys, values = query.double(), keys.double(), values.double()
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    context, new = keys.shape[0], query.shape[0]
    distance = torch.arange(context)[None, :] - torch.arange(context - new, context)[:, None]
    scores = torch.einsum("qhd,khd->hqk", query, keys) * scale
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.double()[:, None, None] * distance
    allowed = distance <= 0
    if sliding_window is not None:
        allowed &= distance > -sliding_window
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


@dataclass
class RunningSequence:
    """A sequence's blocks, and per layer its whole key/value history for the reference."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    blocks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.keys[0].shape[0]


class Engine:
    """What the tgis_native engine does around attention: blocks per sequence, one step at a time,
    and every output checked against the reference on the sequence's whole history."""

    def __init__(
        self,
        *,
        heads: int = 4,
        kv_heads: int = 4,
        block_size: int = 4,
        num_blocks: int = 32,
        alibi: bool = False,
        sliding_window: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        backend: str | None = None,
        seed: int = 0,
        head_dim: int = HEAD_DIM,
        scale: float | None = None,
        decode_kernel: bool = False,
    ) -> None:
        self.heads, self.kv_heads, self.block_size, self.head_dim = heads, kv_heads, block_size, head_dim
        self.dtype, self.device = dtype, device
        self.sliding_window = sliding_window
        self.generator = torch.Generator().manual_seed(seed)
        # A free list in random order, so block tables are scattered, not 0, 1, 2...
        self.free_blocks = list(range(num_blocks))
        random.Random(seed).shuffle(self.free_blocks)
        self.cache = PagedKVCache(
            NUM_LAYERS,
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            dtype,
            device,
            backend or "torch",
            num_heads=heads,
            decode_kernel=decode_kernel,
        )
        self.alibi_slopes = torch.tensor([2 ** (-(i + 1) / 2) for i in range(heads)]) if alibi else None
        self.scale = head_dim**-0.5 if scale is None else scale
        self.seqs: dict[str, RunningSequence] = {}

    def _random(self, *shape: int) -> torch.Tensor:
        # Rounded to the cache's dtype first, so the reference sees exactly what the cache holds.
        return torch.randn(*shape, generator=self.generator, dtype=torch.float64).to(self.dtype)

    def step(self, new_tokens: dict[str, int], atol: float = 1e-5) -> AttentionMetadata:
        for name, n in new_tokens.items():
            if name not in self.seqs:
                empty = torch.empty(0, self.kv_heads, self.head_dim, dtype=self.dtype)
                self.seqs[name] = RunningSequence([empty] * NUM_LAYERS, [empty] * NUM_LAYERS)
            seq = self.seqs[name]
            missing = blocks_for(len(seq) + n, self.block_size) - len(seq.blocks)
            seq.blocks += [self.free_blocks.pop() for _ in range(max(missing, 0))]
        seqs = [self.seqs[name] for name in new_tokens]
        query_lens = list(new_tokens.values())
        meta = AttentionMetadata.build(
            query_lens,
            [len(seq) + n for seq, n in zip(seqs, query_lens, strict=True)],
            [seq.blocks for seq in seqs],
            self.block_size,
            self.device,
        )
        plan_attention(self.cache, meta)
        total = sum(query_lens)
        slopes = None if self.alibi_slopes is None else self.alibi_slopes.to(self.device)
        for layer in range(NUM_LAYERS):
            query = self._random(total, self.heads, self.head_dim)
            keys = self._random(total, self.kv_heads, self.head_dim)
            values = self._random(total, self.kv_heads, self.head_dim)
            self.cache.store(layer, keys.to(self.device), values.to(self.device), meta.slots)
            out = paged_attention(
                query.to(self.device),
                self.cache,
                layer,
                meta,
                self.scale,
                alibi_slopes=slopes,
                sliding_window=self.sliding_window,
            ).cpu()
            assert out.shape == query.shape
            start = 0
            for seq, n in zip(seqs, query_lens, strict=True):
                rows = slice(start, start + n)
                seq.keys[layer] = torch.cat([seq.keys[layer], keys[rows]])
                seq.values[layer] = torch.cat([seq.values[layer], values[rows]])
                expected = reference_attention(
                    query[rows], seq.keys[layer], seq.values[layer], self.scale, self.alibi_slopes, self.sliding_window
                )
                torch.testing.assert_close(out[rows].double(), expected, rtol=0, atol=atol)
                start += n
        return meta

    def finish(self, name: str) -> None:
        self.free_blocks += self.seqs.pop(name).blocks


@CPU_BACKENDS
def test_prefill_of_ragged_sequences_on_scattered_blocks_matches_reference(backend: str) -> None:
    engine = Engine(backend=backend)
    engine.step({"a": 5, "b": 1, "c": 17})
    tables = [engine.seqs[name].blocks for name in "abc"]
    assert [len(t) for t in tables] == [2, 1, 5]
    assert any(t != list(range(t[0], t[0] + len(t))) for t in tables)


@CPU_BACKENDS
def test_decode_steps_cross_block_boundaries_and_match_reference(backend: str) -> None:
    engine = Engine(backend=backend)
    engine.step({"a": 5, "b": 1, "c": 17})
    for _ in range(6):
        meta = engine.step({"a": 1, "b": 1, "c": 1})
        assert meta.max_q == 1
    assert [len(engine.seqs[name].blocks) for name in "abc"] == [3, 2, 6]


@CPU_BACKENDS
def test_mixed_step_prefills_a_new_sequence_while_others_decode(backend: str) -> None:
    engine = Engine(backend=backend)
    engine.step({"a": 5, "b": 1, "c": 17})
    engine.step({"a": 1, "new": 9, "b": 1, "c": 3})
    engine.step({"new": 1, "c": 1})


@CPU_BACKENDS
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (8, 1)], ids=["gqa", "mqa"])
def test_grouped_and_multi_query_heads_match_reference(heads: int, kv_heads: int, backend: str) -> None:
    engine = Engine(heads=heads, kv_heads=kv_heads, backend=backend)
    engine.step({"a": 5, "b": 1, "c": 17})
    engine.step({"a": 1, "b": 2, "c": 1})


@CPU_BACKENDS
def test_alibi_bias_matches_reference(backend: str) -> None:
    engine = Engine(heads=8, kv_heads=8, alibi=True, backend=backend)
    engine.step({"a": 5, "b": 1, "c": 17})
    engine.step({"a": 1, "b": 1, "c": 1, "d": 6})


@CPU_BACKENDS
def test_sliding_window_sees_only_the_last_tokens(backend: str) -> None:
    engine = Engine(sliding_window=3, backend=backend)
    engine.step({"a": 5, "b": 1, "c": 17})
    engine.step({"a": 1, "b": 1, "c": 2})


@CPU_BACKENDS
def test_freed_blocks_are_reused_without_stale_keys_leaking(backend: str) -> None:
    engine = Engine(num_blocks=8, backend=backend)
    engine.step({"old": 17, "keep": 3})
    old_blocks = set(engine.seqs["old"].blocks)
    engine.finish("old")
    assert len(engine.free_blocks) == 7
    # Shorter than the old sequence, so its blocks still hold the old keys past its length.
    engine.step({"keep": 1, "new": 6})
    assert set(engine.seqs["new"].blocks) <= old_blocks
    engine.step({"keep": 1, "new": 1})


def kernel_view(meta: AttentionMetadata, num_blocks: int, block_size: int, sliding_window: int | None) -> torch.Tensor:
    """[B, max_q, num_blocks * block_size]: what FlexAttention's kernel lets each query see. It
    visits only the listed blocks and skips ``mask_mod`` on full ones, which eager mode does not
    show, so the block lists are checked here against ``mask_mod`` alone."""
    layout = flex_paged._layout(meta, num_blocks, block_size)
    mask = flex_paged._block_mask(meta, layout, sliding_window)
    q_idx = torch.arange(meta.max_q)[:, None]
    kv_idx = torch.arange(num_blocks * block_size)[None, :]
    seen = torch.zeros(meta.num_seqs, meta.max_q, num_blocks * block_size, dtype=torch.bool)
    for b in range(meta.num_seqs):
        exact = mask.mask_mod(torch.tensor(b), torch.tensor(0), q_idx, kv_idx)
        for tile in range(mask.kv_num_blocks.shape[-1]):
            rows = slice(tile * flex_paged.QUERY_TILE, (tile + 1) * flex_paged.QUERY_TILE)
            full = mask.full_kv_indices[b, 0, tile, : mask.full_kv_num_blocks[b, 0, tile]].tolist()
            partial = mask.kv_indices[b, 0, tile, : mask.kv_num_blocks[b, 0, tile]].tolist()
            assert not set(full) & set(partial)
            for block in full:
                seen[b, rows, block * block_size : (block + 1) * block_size] = True
            for block in partial:
                cols = slice(block * block_size, (block + 1) * block_size)
                seen[b, rows, cols] = exact[rows, cols]
    return seen


@pytest.mark.parametrize("sliding_window", [None, 150], ids=["causal", "window"])
def test_flex_block_lists_give_the_kernel_exactly_the_causal_mask(sliding_window: int | None) -> None:
    block_size, num_blocks = 32, 64
    # Prefills spanning several query tiles (one joining a longer context), and decodes.
    query_lens, context_lens = [300, 1, 129, 1], [300, 77, 400, 1]
    order = list(range(num_blocks))
    random.Random(1).shuffle(order)
    tables, start = [], 0
    for ctx in context_lens:
        tables.append(order[start : start + blocks_for(ctx, block_size)])
        start += len(tables[-1])
    meta = AttentionMetadata.build(query_lens, context_lens, tables, block_size, "cpu")
    seen = kernel_view(meta, num_blocks, block_size, sliding_window)
    expected = torch.zeros_like(seen)
    for b, (q_len, ctx, table) in enumerate(zip(query_lens, context_lens, tables, strict=True)):
        seen[b, q_len:] = False  # padding rows: computed, then dropped
        for j in range(q_len):
            position = ctx - q_len + j
            for key in range(max(0, position - sliding_window + 1) if sliding_window else 0, position + 1):
                expected[b, j, table[key // block_size] * block_size + key % block_size] = True
    assert torch.equal(seen, expected)


def test_metadata_puts_new_tokens_at_the_end_of_each_context() -> None:
    meta = AttentionMetadata.build([2, 1], [6, 3], [[7, 3], [5, 9]], block_size=4, device="cpu", max_blocks=3)
    assert meta.cu_seqlens_q.tolist() == [0, 2, 3]
    assert meta.positions.tolist() == [4, 5, 2]
    assert meta.slots.tolist() == [3 * 4 + 0, 3 * 4 + 1, 5 * 4 + 2]
    assert meta.block_tables.tolist() == [[7, 3, 0], [5, 0, 0]]
    assert meta.block_tables.dtype == meta.context_lens.dtype == meta.cu_seqlens_q.dtype == torch.int32
    assert (meta.max_q, meta.max_context) == (2, 6)


@pytest.mark.parametrize(
    ("query_lens", "context_lens", "tables", "message"),
    [
        ([3], [2], [[0]], "query_len"),
        ([0], [2], [[0]], "query_len"),
        ([1], [5], [[0]], "need 2 blocks"),
        ([1, 1], [1], [[0]], "one entry per sequence"),
    ],
)
def test_metadata_rejects_inconsistent_steps(
    query_lens: list[int], context_lens: list[int], tables: list[list[int]], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        AttentionMetadata.build(query_lens, context_lens, tables, block_size=4, device="cpu")


@pytest.mark.parametrize(
    ("flash_attn", "flashinfer", "triton", "expected"),
    [
        (True, True, True, "flash"),
        (False, True, True, "flashinfer"),
        (False, False, True, "flex"),
        (False, False, False, "torch"),
    ],
    ids=["flash-attn", "flashinfer", "triton", "none"],
)
def test_backend_is_the_fastest_installed_on_cuda_and_torch_elsewhere(
    monkeypatch: pytest.MonkeyPatch, flash_attn: bool, flashinfer: bool, triton: bool, expected: str
) -> None:
    monkeypatch.setattr(paged_attention_module, "_flash_attn", lambda: object() if flash_attn else None)
    monkeypatch.setattr(paged_attention_module, "_flashinfer_serves", lambda head_dim: flashinfer)
    monkeypatch.setattr(paged_attention_module, "_flex_available", lambda: triton)
    assert choose_backend("cuda", torch.bfloat16, 128) == expected
    # FlashInfer brings its own ALiBi slopes, which a rank's slice of heads would get wrong.
    with_alibi = expected if expected != "flashinfer" else "flex"
    assert choose_backend("cuda", torch.bfloat16, 128, alibi=True) == with_alibi
    # Nor does its plan take a sliding window.
    assert choose_backend("cuda", torch.bfloat16, 128, sliding_window=True) == with_alibi
    assert choose_backend("cpu", torch.bfloat16, 128) == "torch"
    # Head sizes the fused kernels don't take; flash-attn only runs half precision.
    assert choose_backend("cuda", torch.bfloat16, 20) == "torch"
    assert choose_backend("cuda", torch.bfloat16, 512) == "torch"
    assert choose_backend("cuda", torch.float32, 128) == ("flex" if triton else "torch")


def test_cache_refuses_block_sizes_flash_attn_cannot_page() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        PagedKVCache(1, 4, 128, 2, HEAD_DIM, torch.float16, "cpu", backend="flash")
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        PagedKVCache(1, 4, 16, 2, HEAD_DIM, torch.float16, "cpu", backend="xformers")
    assert PagedKVCache(1, 4, BLOCK_SIZES["flex"], 2, HEAD_DIM, torch.float16, "cpu", backend="flex").backend == "flex"


@pytest.mark.skipif(not torch.cuda.is_available() or not _flex_available(), reason="needs CUDA, Triton, torch>=2.11")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("alibi", "sliding_window"), [(False, None), (True, None), (False, 200)], ids=["plain", "alibi", "window"]
)
def test_compiled_flex_backend_on_cuda_matches_reference(
    dtype: torch.dtype, alibi: bool, sliding_window: int | None
) -> None:
    engine = Engine(
        heads=8,
        kv_heads=2,
        block_size=BLOCK_SIZES["flex"],
        num_blocks=24,
        dtype=dtype,
        device="cuda",
        backend="flex",
        alibi=alibi,
        sliding_window=sliding_window,
    )
    # Prefills longer than a block and a query tile, a prefill joining decodes, then decodes.
    engine.step({"a": 300, "b": 1, "c": 700}, atol=2e-2)
    engine.step({"a": 1, "b": 1, "c": 1, "d": 40}, atol=2e-2)
    engine.finish("b")
    for _ in range(3):
        engine.step({"a": 1, "c": 1, "d": 1}, atol=2e-2)


def test_flashinfer_pages_list_each_sequences_blocks_its_context_covers() -> None:
    meta = AttentionMetadata.build([3, 1, 1], [3, 17, 16], [[7], [2, 9, 4], [5, 6]], block_size=8, device="cpu")
    assert meta.host is not None
    indptr, indices, last_page_len = pages_of(meta.host, block_size=8)
    assert indptr.tolist() == [0, 1, 4, 6]
    assert indices.tolist() == [7, 2, 9, 4, 5, 6]
    assert last_page_len.tolist() == [3, 1, 8]
    assert indptr.dtype == indices.dtype == last_page_len.dtype == np.int32


@pytest.mark.parametrize(("query_lens", "expected"), [([1, 1, 5, 1], 2), ([4, 1], 0), ([1, 1, 1], 3), ([1, 9], 1)])
def test_flashinfer_runs_the_decodes_leading_a_step_apart(query_lens: list[int], expected: int) -> None:
    cu_seqlens_q = np.cumsum([0, *query_lens])
    assert leading_decodes(cu_seqlens_q) == expected


def test_flashinfer_page_lists_split_between_the_decodes_and_the_prompt_chunks() -> None:
    # Two decodes (17 and 16 tokens of context), then a prompt of 3 tokens.
    meta = AttentionMetadata.build([1, 1, 3], [17, 16, 3], [[2, 9, 4], [5, 6], [7]], block_size=8, device="cpu")
    assert meta.host is not None
    decodes, prompts = split_pages(pages_of(meta.host, block_size=8), leading_decodes(meta.host.cu_seqlens_q))
    assert [a.tolist() for a in decodes] == [[0, 3, 5], [2, 9, 4, 5, 6], [1, 8]]
    assert [a.tolist() for a in prompts] == [[0, 1], [7], [3]]


def test_a_decode_graphs_workspace_holds_what_flashinfer_asked_for_at_4096_rows() -> None:
    # On an H100 (132 multiprocessors), capturing the 8B shape's decode graph of 4,096 rows failed:
    # "Buffer overflow when allocating memory for batch_prefill_tmp_v with size 1341915136".
    tmp_v = 1_341_915_136
    assert tmp_v < decode_graph_workspace_bytes(32, 8, 128, 4096, sms=132) < 1.1 * tmp_v
    # The served batch sizes of the bench fit the shared workspace; 512 rows do not.
    assert decode_graph_workspace_bytes(32, 8, 128, 128, sms=132) <= WORKSPACE_BYTES
    assert decode_graph_workspace_bytes(32, 8, 128, 512, sms=132) > WORKSPACE_BYTES


@pytest.mark.skipif(not torch.cuda.is_available() or not flashinfer_available(), reason="needs CUDA and flashinfer")
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4), (8, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("scale", [None, 0.05], ids=["default-scale", "own-scale"])
@pytest.mark.parametrize("decode_kernel", [False, True], ids=["flashinfer-decodes", "decode-kernel"])
def test_flashinfer_backend_on_cuda_matches_reference(
    heads: int, kv_heads: int, scale: float | None, decode_kernel: bool
) -> None:
    # bfloat16 at head size 128 only: each dtype and head size is a kernel FlashInfer compiles
    # (a minute or more each); the served models' shape is this one. With the decode kernel, the
    # decodes leading a step with prompts go to it too, the prompts to FlashInfer.
    engine = Engine(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=128,
        block_size=BLOCK_SIZES["flashinfer"],
        num_blocks=160,
        dtype=torch.bfloat16,
        device="cuda",
        backend="flashinfer",
        scale=scale,
        decode_kernel=decode_kernel,
    )
    # Prefills over many pages, a prefill joining decodes (the prefill kernel), then decodes alone.
    engine.step({"a": 300, "b": 1, "c": 700}, atol=2e-2)
    engine.step({"a": 1, "b": 1, "c": 1, "d": 40}, atol=2e-2)
    assert engine.cache.planner.kernel_rows == (3 if decode_kernel else 0)
    engine.finish("b")
    for _ in range(3):
        meta = engine.step({"a": 1, "c": 1, "d": 1}, atol=2e-2)
    # Naming the cache's own backend runs the step as planned (on the kernel: no FlashInfer plan).
    query = torch.randn(3, heads, 128, device="cuda", dtype=torch.bfloat16)
    planned = paged_attention(query, engine.cache, 0, meta, engine.scale)
    named = paged_attention(query, engine.cache, 0, meta, engine.scale, backend="flashinfer")
    assert torch.equal(named, planned)


@pytest.mark.skipif(not torch.cuda.is_available() or not flashinfer_available(), reason="needs CUDA and flashinfer")
@pytest.mark.parametrize(
    "contexts",
    [[1, 15, 16, 17, 200, 333, 700, 1000], [4096], [2048, 2048, 5000, 1, 17, 8000, 100, 3000]],
    ids=["mixed", "one-long", "long-batch"],
)
@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "cuda-cores"])
def test_flashinfer_decode_graph_plans_equal_the_torch_backend(contexts: list[int], tensor_cores: bool) -> None:
    """The decode wrapper of a graph's bucket as the engine runs it: captured in a CUDA graph over
    padding rows (one token each in a scratch block), then planned for the step's contexts, as
    long as a request may be, and replayed; on tensor cores or on FlashInfer's CUDA-core decode
    kernel."""
    heads, kv_heads, head_dim, block_size = 8, 2, 128, BLOCK_SIZES["flashinfer"]
    rows = len(contexts)
    pages = [blocks_for(c, block_size) for c in contexts]
    blocks = list(range(sum(pages)))
    random.Random(0).shuffle(blocks)
    tables = [blocks[sum(pages[:i]) : sum(pages[: i + 1])] for i in range(rows)]
    scratch = len(blocks)
    cache = PagedKVCache(
        1, scratch + 1, block_size, kv_heads, head_dim, torch.bfloat16, "cuda", backend="flashinfer", num_heads=heads
    )
    assert cache.planner is not None
    cache.planner.tensor_core_graph_rows = 1 if tensor_cores else rows + 1
    generator = torch.Generator(device="cuda").manual_seed(0)
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator, device="cuda"))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator, device="cuda"))
    query = torch.zeros(rows, heads, head_dim, device="cuda", dtype=torch.bfloat16)

    # Captured by the engine's own capture, planned as it plans a bucket: over padding rows.
    padding = AttentionMetadata.build([1] * rows, [1] * rows, [[scratch]] * rows, block_size, "cuda")
    graphs = DecodeGraphs.capture(
        lambda _rows: paged_attention(query, cache, 0, padding, head_dim**-0.5),
        [rows],
        query.device,
        lambda _rows: plan_attention(cache, padding, graph_rows=rows),
    )

    meta = AttentionMetadata.build([1] * rows, contexts, tables, block_size, "cuda")
    query.copy_(torch.randn(query.shape, generator=generator, device="cuda", dtype=torch.bfloat16))
    plan_attention(cache, meta, graph_rows=rows)
    out = graphs.replay(rows)
    reference = paged_attention(query, cache, 0, meta, head_dim**-0.5, backend="torch")
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alibi", [False, True], ids=["plain", "alibi"])
def test_torch_backend_on_cuda_matches_reference(dtype: torch.dtype, alibi: bool) -> None:
    engine = Engine(heads=8, kv_heads=2, dtype=dtype, device="cuda", backend="torch", alibi=alibi)
    engine.step({"a": 5, "b": 1, "c": 17}, atol=2e-2)
    engine.step({"a": 1, "b": 1, "c": 1, "d": 7}, atol=2e-2)
    engine.step({"a": 1, "b": 1, "c": 1, "d": 1}, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or _flash_attn() is None, reason="needs CUDA and flash-attn >= 2.6")
@pytest.mark.parametrize(
    ("alibi", "sliding_window"), [(False, None), (True, None), (False, 300)], ids=["plain", "alibi", "window"]
)
def test_flash_backend_matches_torch_backend(alibi: bool, sliding_window: int | None) -> None:
    block_size, heads, kv_heads, head_dim = 256, 8, 2, 64
    # Per step, new tokens of each sequence: prefill, then a prefill joining decodes, then decode.
    steps = [{0: 300, 1: 1, 2: 700}, {0: 1, 1: 1, 2: 1, 3: 40}, {0: 1, 1: 1, 2: 1, 3: 1}]
    tables = [[3, 9], [0], [12, 1, 7, 5], [14]]
    cache = PagedKVCache(1, 16, block_size, kv_heads, head_dim, torch.bfloat16, "cuda", backend="flash")
    assert choose_backend("cuda", torch.bfloat16, head_dim) == "flash"
    generator = torch.Generator(device="cuda").manual_seed(0)
    slopes = torch.tensor([2 ** (-(i + 1)) for i in range(heads)], device="cuda") if alibi else None
    context = [0] * len(tables)
    for step in steps:
        for seq, n in step.items():
            context[seq] += n
        meta = AttentionMetadata.build(
            list(step.values()), [context[seq] for seq in step], [tables[seq] for seq in step], block_size, "cuda"
        )
        total = sum(step.values())
        kv = torch.randn(2, total, kv_heads, head_dim, generator=generator, device="cuda", dtype=torch.bfloat16)
        cache.store(0, kv[0], kv[1], meta.slots)
        query = torch.randn(total, heads, head_dim, generator=generator, device="cuda", dtype=torch.bfloat16)
        flash, torch_ = (
            paged_attention(query, cache, 0, meta, head_dim**-0.5, slopes, sliding_window, backend=backend)
            for backend in ("flash", "torch")
        )
        torch.testing.assert_close(flash, torch_, rtol=0, atol=2e-2)
