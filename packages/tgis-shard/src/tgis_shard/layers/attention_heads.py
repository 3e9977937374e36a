"""A layer's attention heads on one rank, from projected queries, keys and values to the output
before the output projection: rotary, the cache write, paged attention. Model families differ in
how they project and lay out their fused QKV; what follows the projection is written once here."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from tgis_shard.layers import fused, kv_write
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache, paged_attention

Rotary = tuple[torch.Tensor, torch.Tensor]
# What a layer's attention call becomes while a step runs in captured pieces
# (``engines.prompt_graphs``): (heads, q, k, v, rotary, cache, meta, alibi_slopes) -> attention's
# output. ``rotary`` is the cache write's to apply (None: q and k are rotated already, or unrotated).
AttentionSplit = Callable[..., torch.Tensor]
_split: AttentionSplit | None = None


@contextlib.contextmanager
def split_at_attention(split: AttentionSplit) -> Iterator[None]:
    """Inside, every layer's cache write and attention go to ``split`` instead."""
    global _split
    previous, _split = _split, split
    try:
        yield
    finally:
        _split = previous


@dataclass(frozen=True)
class AttentionHeads:
    layer: int
    num_heads: int  # on this rank
    num_kv_heads: int  # on this rank (replicated when fewer than the ranks)
    head_dim: int
    softmax_scale: float | None = None  # None: 1 / sqrt(head_dim)
    sliding_window: int | None = None  # each token sees this many keys, itself included; None: all

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5 if self.softmax_scale is None else self.softmax_scale

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[tokens, (heads + 2 kv_heads) × head_dim]`` laid out [q | k | v] → per-head views."""
        tokens = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        return (
            q.view(tokens, self.num_heads, self.head_dim),
            k.view(tokens, self.num_kv_heads, self.head_dim),
            v.view(tokens, self.num_kv_heads, self.head_dim),
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        rotary: Rotary | None = None,
        alibi_slopes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rotates q and k (when given cos/sin), writes k and v to the cache, attends over it:
        ``[tokens, heads × head_dim]``, ready for the row-parallel output projection."""
        # On GPUs the cache write rotates (one kernel), in a step captured in pieces too (at the
        # end of the piece before attention); a PT2_COMPILE graph compiles the rotation with the
        # layer around it.
        if rotary is not None and not kv_write.applies(k, v, q, cos=rotary[0]):
            q, k = fused.rotate(q, k, *rotary)
            rotary = None
        out = self._store_and_attend(q, k, v, cache, meta, rotary, alibi_slopes)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    # Outside torch.compile (PT2_COMPILE): the attention kernels are compiled or hand-written
    # already, and the step's metadata (sizes, strides, block tables) would make compiled code
    # guard on every new kind of step. The layers around it see only [tokens, ...] tensors.
    @torch.compiler.disable
    def _store_and_attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        rotary: Rotary | None,
        alibi_slopes: torch.Tensor | None,
    ) -> torch.Tensor:
        if _split is not None:
            return _split(self, q, k, v, rotary, cache, meta, alibi_slopes)
        if rotary is None:
            cache.store(self.layer, k, v, meta.slots)
        else:
            q = cache.rotate_and_store(self.layer, q, k, v, rotary, meta.slots)
        return self.attend_cached(q, cache, meta, alibi_slopes)

    def attend_cached(
        self, q: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata, alibi_slopes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of rotated queries over the cache, which holds this step's keys and values."""
        return paged_attention(
            q, cache, self.layer, meta, self.scale, alibi_slopes=alibi_slopes, sliding_window=self.sliding_window
        )
