"""Paged attention through FlexAttention: the fused GPU path when flash-attn is not installed.

FlexAttention (torch >= 2.5) generates a flash-style tiled kernel with Triton. It reads the KV
cache in place: the whole cache is one key sequence ``[1, kv_heads, num_blocks * block_size,
head_dim]`` shared by every sequence of the step, and a block mask built from the block tables
lists, per sequence and query tile, the cache blocks it may visit. The kernel skips every other
block, so a step reads what flash-attn's paged kernels read, without gathering or masking a
padded copy.

``mask_mod`` decides on its own which cache entries a query sees (eager FlexAttention, used on
CPU to test this module, ignores the block lists): the entry's block must belong to the query's
sequence, and its position in that sequence must not be after the query's. ALiBi and sliding
windows are expressed on the same positions, so all backends compute the same function.

FlexAttention is imported where it is used: the package supports torch releases without it, and
``choose_backend`` picks this backend only on the releases it was verified with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tgis_shard.layers.paged_attention import AttentionMetadata, blocks_for

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

T = torch.Tensor
# The main kernel for every step. FlexAttention's decoding kernel (short queries, static batch)
# splits the whole key length across its programs once full blocks are listed: over a cache far
# longer than any sequence that serialises decode, and torch 2.11's Triton lowering of it failed
# to compile (int32/int64 mismatch) for a 1.9M-block cache on an H200.
KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}
# Compiled FlexAttention graphs allowed per process (see _compiled_flex_attention).
FLEX_GRAPH_LIMIT = 64
# Query rows per tile of the block mask: FlexAttention's default sparse block size.
QUERY_TILE = 128


@dataclass(frozen=True)
class FlexLayout:
    """Per step, shared by all layers: where each query sits and what each cache block holds."""

    query_positions: torch.Tensor
    """[B, max_q] int: absolute position of each padded query row; -1 on padding rows."""
    block_owner: torch.Tensor
    """[num_blocks] int32: the step's sequence owning each cache block, -1 for none."""
    block_index: torch.Tensor
    """[num_blocks] int32: the block's index within its owner's block table."""
    block_size: int

    def position(self, kv_idx: torch.Tensor) -> torch.Tensor:
        """Position within its own sequence of the cache entry at flat slot ``kv_idx``."""
        return self.block_index[kv_idx // self.block_size] * self.block_size + kv_idx % self.block_size


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    # Without compilation FlexAttention scores every query against the whole cache, so running
    # out of graphs must not happen: dynamo's default limit of 8 falls back to eager. Sizes are
    # left to automatic dynamic shapes: the cache's length stays a constant (fully dynamic
    # shapes made decode ~4× slower on an H200), and batch, query and table sizes turn dynamic
    # on their first change; size-1 and flag specialisations give a dozen graphs at most.
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, FLEX_GRAPH_LIMIT)
    return torch.compile(flex_attention)


def _eager_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """Same contract as ``paged_attention``; compiled on CUDA, eager (and slow) elsewhere."""
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    heads = query.shape[1]
    layout, block_mask = prepare_flex_attention(meta, num_blocks, block_size, sliding_window)
    score_mod = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(torch.float32)

        def score_mod(score: T, b: T, h: T, q_idx: T, kv_idx: T) -> T:
            return score + slopes[h] * (layout.position(kv_idx) - layout.query_positions[b, q_idx])

    cache_keys = key_cache.view(1, num_blocks * block_size, kv_heads, head_dim).transpose(1, 2)
    cache_values = value_cache.view(1, num_blocks * block_size, kv_heads, head_dim).transpose(1, 2)
    attend = _compiled_flex_attention() if query.is_cuda else _eager_flex_attention()
    out = attend(
        meta.pad_rows(query).transpose(1, 2),
        cache_keys,
        cache_values,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=kv_heads != heads,
        kernel_options=KERNEL_OPTIONS,
    )
    return meta.unpad_rows(out.transpose(1, 2))


def prepare_flex_attention(
    meta: AttentionMetadata, num_blocks: int, block_size: int, sliding_window: int | None = None
) -> tuple[FlexLayout, BlockMask]:
    """The step's layout and block mask, built on first use and kept in ``meta`` for every layer."""
    layout = meta.derived(("flex-layout", num_blocks, block_size), lambda: _layout(meta, num_blocks, block_size))
    block_mask = meta.derived(
        ("flex-mask", num_blocks, block_size, sliding_window), lambda: _block_mask(meta, layout, sliding_window)
    )
    return layout, block_mask


def _layout(meta: AttentionMetadata, num_blocks: int, block_size: int) -> FlexLayout:
    device = meta.block_tables.device
    num_seqs, width = meta.block_tables.shape
    used = torch.arange(width, device=device) < blocks_for(meta.context_lens.long(), block_size)[:, None]
    # Unused table entries (padding) scatter into a spare last element, dropped afterwards.
    targets = torch.where(used, meta.block_tables.long(), num_blocks).flatten()
    owner = torch.full((num_blocks + 1,), -1, dtype=torch.int32, device=device)
    # expand, not repeat_interleave: that one synchronises with the GPU to size its output.
    owner.scatter_(
        0, targets, torch.arange(num_seqs, dtype=torch.int32, device=device)[:, None].expand(-1, width).flatten()
    )
    index = torch.zeros(num_blocks + 1, dtype=torch.int32, device=device)
    index.scatter_(0, targets, torch.arange(width, dtype=torch.int32, device=device).expand(num_seqs, -1).flatten())
    query_positions = meta.pad_rows(meta.positions, fill=-1)
    return FlexLayout(query_positions, owner[:num_blocks], index[:num_blocks], block_size)


def _block_mask(meta: AttentionMetadata, layout: FlexLayout, sliding_window: int | None) -> BlockMask:
    """Per sequence and query tile: the blocks every query of the tile sees whole ("full": the
    kernel skips ``mask_mod`` there), then the blocks from the tile's first query position up to
    its last ("partial": the causal edge, masked per entry). Later blocks are all future."""
    from torch.nn.attention.flex_attention import BlockMask

    block_size = layout.block_size
    num_seqs, width = meta.block_tables.shape
    device = meta.block_tables.device
    query_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).long()[:, None]
    tiles = -(-meta.max_q // QUERY_TILE)
    tile_start = torch.arange(tiles, device=device)[None, :] * QUERY_TILE
    first_position = meta.context_lens.long()[:, None] - query_lens + tile_start
    tile_end = torch.minimum(tile_start + QUERY_TILE, query_lens)
    real = tile_start < query_lens
    visible = torch.where(real, blocks_for(first_position - tile_start + tile_end, block_size), 0)
    # A sliding window cuts into early blocks too: then every visible block is masked.
    full = (
        torch.zeros_like(visible) if sliding_window is not None else torch.where(real, first_position // block_size, 0)
    )
    tables = meta.block_tables.view(num_seqs, 1, 1, width).expand(num_seqs, 1, tiles, width)
    # Partial blocks are listed from the first one that is not full.
    shifted = (torch.arange(width, device=device) + full.unsqueeze(-1)).clamp(max=width - 1)
    partial_indices = meta.block_tables.long().gather(1, shifted.view(num_seqs, -1)).view(num_seqs, 1, tiles, width)

    def mask_mod(b: T, h: T, q_idx: T, kv_idx: T) -> T:
        distance = layout.position(kv_idx) - layout.query_positions[b, q_idx]
        allowed = (layout.block_owner[kv_idx // block_size] == b) & (distance <= 0)
        if sliding_window is not None:
            allowed = allowed & (distance > -sliding_window)
        return allowed

    def counts(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(torch.int32).view(num_seqs, 1, tiles)

    return BlockMask.from_kv_blocks(
        counts(visible - full),
        partial_indices.to(torch.int32),
        counts(full),
        tables.contiguous(),
        BLOCK_SIZE=(QUERY_TILE, block_size),
        mask_mod=mask_mod,
        seq_lengths=(meta.max_q, layout.block_owner.shape[0] * block_size),
        compute_q_blocks=False,
    )
