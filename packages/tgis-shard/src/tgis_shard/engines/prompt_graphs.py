"""Steps with prompt chunks replayed from CUDA graphs in pieces: everything but attention.

Eagerly, a step with prompt chunks launches ~1,200 kernels, each with dispatcher or compiled
code's host work in front of it: on an H100 (8B shape) a 128-token prompt took 46 ms on the host
for 7 ms of device work, and at 128 streams every step mixing a prompt chunk into the decodes
took ~54 ms. Only attention depends on how the step's tokens divide into sequences; every other
kernel depends on the token count alone. So per token-count bucket the forward pass is captured
as one graph per stretch between two attention calls, and a step pads to its bucket and replays
them, with attention run eagerly between them over the step's own metadata: ~33 replays and 32
attention calls instead of ~1,200 launches.

A step whose prompts start with prompt prefixes replays them too: the prefixes' embeddings go
into a fixed buffer, and a fixed mask says which rows take them (``EmbeddingOverrides`` in its
mask form, applied inside the first piece).

The pieces hand over through fixed buffers around each attention call: inside the piece before
it, the keys and values go to the cache at slots from a fixed buffer (a padding row's at the
engine's scratch slot) and the rotated queries into a fixed buffer; attention's output comes back
in another. A family's forward pass may read the step's metadata only through ``AttentionHeads``
(the families here do): inside a graph it would be the capture's.

The buckets share one memory pool, captured largest first (one step's pieces run before the
next step's), apart from the decode graphs' pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tgis_shard.engines.cuda_graphs import WARM_RUNS, smallest_bucket
from tgis_shard.layers import attention_heads
from tgis_shard.layers.attention_heads import AttentionHeads, Rotary
from tgis_shard.layers.embedding import EmbeddingOverrides
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache
from tgis_shard.progress import progress

log = logging.getLogger(__name__)

# Above this many tokens a step's device work outlasts its host work (H100, 8B shape: ~45 ms of
# matrix products at 2,048 tokens): it runs eagerly, without a graph's memory held for it.
MAX_GRAPHED_TOKENS = 2048

# The family's forward pass over fixed inputs: (input_ids, positions, cache, meta) -> hidden.
Forward = Callable[[torch.Tensor, torch.Tensor, PagedKVCache, AttentionMetadata], torch.Tensor]


def token_buckets(max_tokens: int = MAX_GRAPHED_TOKENS) -> list[int]:
    """Token counts to capture: 16, 32, 64, then every multiple of 128 up to ``max_tokens``; a step
    pads by at most 127 tokens (a quarter of its own from 128 tokens on)."""
    return sorted({*(b for b in (16, 32, 64) if b < max_tokens), *range(128, max_tokens + 1, 128), max_tokens})


@dataclass(frozen=True)
class _Attention:
    """One attention call between two pieces: whose heads, and what to pass them."""

    heads: AttentionHeads
    alibi_slopes: torch.Tensor | None
    queries: torch.Tensor  # the fixed buffer the piece before fills
    output: torch.Tensor  # the fixed buffer the piece after reads


@dataclass(frozen=True)
class _Bucket:
    pieces: list[torch.cuda.CUDAGraph]
    attention: list[_Attention]  # one fewer than pieces


class PromptGraphs:
    """The captured pieces of each token bucket; ``run`` replays a step through them."""

    def __init__(
        self,
        forward: Forward,
        cache: PagedKVCache,
        device: torch.device,
        scratch_slot: int,
        prefix_embeddings: tuple[int, torch.dtype] | None = None,
    ):
        """``prefix_embeddings``: the width and dtype of the model's word embeddings where it takes
        prompt prefixes (its forward pass then takes ``embedding_overrides``); None where not."""
        self._forward = forward
        self._cache = cache
        self._device = device
        self._scratch_slot = scratch_slot
        self._buckets: dict[int, _Bucket] = {}
        self.buckets: list[int] = []
        size = MAX_GRAPHED_TOKENS
        self._input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, dtype=torch.long, device=device)
        self._slots = torch.full((size,), scratch_slot, dtype=torch.long, device=device)
        self._overrides: EmbeddingOverrides | None = None  # the mask and the embeddings, fixed
        if prefix_embeddings is not None:
            width, dtype = prefix_embeddings
            self._overrides = EmbeddingOverrides(
                torch.zeros(size, dtype=torch.bool, device=device),
                torch.zeros(size, width, dtype=dtype, device=device),
            )
        self._hidden: torch.Tensor | None = None
        # Per shape and dtype of a layer's queries and attention output: one buffer each, shared by
        # every layer and bucket (one attention call at a time reads and writes them).
        self._handover: dict[tuple, torch.Tensor] = {}

    def bucket_for(self, tokens: int) -> int | None:
        """The smallest captured token count holding ``tokens``; None when none does."""
        return smallest_bucket(self.buckets, tokens)

    def _buffer(self, role: str, like: torch.Tensor) -> torch.Tensor:
        key = (role, tuple(like.shape[1:]), like.dtype)
        if key not in self._handover:
            self._handover[key] = torch.zeros(
                (MAX_GRAPHED_TOKENS, *like.shape[1:]), dtype=like.dtype, device=self._device
            )
        return self._handover[key]

    def _fill(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, bucket: int, overrides: EmbeddingOverrides | None
    ) -> None:
        """The step's tokens into the fixed inputs; padding rows write their keys to scratch."""
        tokens = input_ids.shape[0]
        self._input_ids[:tokens].copy_(input_ids)
        self._positions[:tokens].copy_(meta.positions)
        self._slots[:tokens].copy_(meta.slots)
        self._slots[tokens:bucket].fill_(self._scratch_slot)
        if self._overrides is not None:
            mask, values = self._overrides.rows, self._overrides.values
            mask[:bucket].fill_(False)
            if overrides is not None:
                mask.index_fill_(0, overrides.rows, True)
                values.index_copy_(0, overrides.rows, overrides.values.to(values.dtype))
        elif overrides is not None:
            raise ValueError("these prompt graphs were captured for a model without prompt prefixes")

    def _hand_over(
        self,
        heads: AttentionHeads,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        rotary: Rotary | None,
        bucket: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The end of a piece: keys and values into the cache, the queries into their buffer (a
        rotary cache write rotates both on the way: one kernel)."""
        buffer = self._buffer("queries", queries)
        if rotary is None:
            self._cache.store(heads.layer, keys, values, self._slots[:bucket])
            buffer[:bucket].copy_(queries)
        else:
            self._cache.rotate_and_store(
                heads.layer, queries, keys, values, rotary, self._slots[:bucket], buffer[:bucket]
            )
        return buffer, self._buffer("output", queries)

    def _attend_between(self, call: _Attention, meta: AttentionMetadata, tokens: int) -> None:
        """The attention between two pieces, over the step's own metadata: the real rows only."""
        out = call.heads.attend_cached(call.queries[:tokens], self._cache, meta, call.alibi_slopes)
        call.output[:tokens].copy_(out.view(tokens, *call.output.shape[1:]))

    def _padded_forward(self, meta: AttentionMetadata, bucket: int) -> torch.Tensor:
        """The forward pass over the fixed inputs' first ``bucket`` rows."""
        ids, positions = self._input_ids[:bucket], self._positions[:bucket]
        if self._overrides is None:
            return self._forward(ids, positions, self._cache, meta)
        mask, values = self._overrides.rows[:bucket], self._overrides.values[:bucket]
        return self._forward(ids, positions, self._cache, meta, embedding_overrides=EmbeddingOverrides(mask, values))

    def _finish(self, hidden: torch.Tensor, bucket: int) -> torch.Tensor:
        if self._hidden is None:
            self._hidden = torch.zeros((MAX_GRAPHED_TOKENS, *hidden.shape[1:]), dtype=hidden.dtype, device=self._device)
        self._hidden[:bucket].copy_(hidden)
        return self._hidden

    def run_uncaptured(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        bucket: int,
        overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """The step through the same buffers and padding as a replay, op by op: the warm runs
        before a capture (and, on a CPU, a check of everything but the graphs)."""
        tokens = input_ids.shape[0]
        self._fill(input_ids, meta, bucket, overrides)

        def attend(heads, q, k, v, rotary, cache, step_meta, alibi_slopes):
            call = _Attention(heads, alibi_slopes, *self._hand_over(heads, q, k, v, rotary, bucket))
            self._attend_between(call, meta, tokens)
            return call.output[:bucket]

        with attention_heads.split_at_attention(attend):
            hidden = self._padded_forward(meta, bucket)
        return self._finish(hidden, bucket)[:tokens]

    def _warm(self, bucket: int, meta: AttentionMetadata, side: torch.cuda.Stream) -> None:
        """The bucket's warm runs on ``side``; then the blocks they used go back to the device, so
        that the capture's pool can take them (``torch.cuda.graph`` does the same)."""
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            for _ in range(WARM_RUNS):
                self.run_uncaptured(self._input_ids[:bucket].clone(), meta, bucket)
        side.synchronize()
        torch.cuda.empty_cache()

    def _capture(
        self, bucket: int, meta: AttentionMetadata, pool: tuple | None, side: torch.cuda.Stream
    ) -> tuple[_Bucket, tuple]:
        pieces = [torch.cuda.CUDAGraph()]
        calls: list[_Attention] = []

        def attend(heads, q, k, v, rotary, cache, step_meta, alibi_slopes):
            queries, output = self._hand_over(heads, q, k, v, rotary, bucket)
            pieces[-1].capture_end()
            calls.append(_Attention(heads, alibi_slopes, queries, output))
            pieces.append(torch.cuda.CUDAGraph())
            pieces[-1].capture_begin(pool=pool or pieces[0].pool())
            return output[:bucket]

        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            pieces[0].capture_begin(pool=pool)
            with attention_heads.split_at_attention(attend):
                hidden = self._padded_forward(meta, bucket)
            self._finish(hidden, bucket)
            pieces[-1].capture_end()
        torch.cuda.current_stream(self._device).wait_stream(side)
        return _Bucket(pieces, calls), pool or pieces[0].pool()

    def capture(self, buckets: list[int], capture_meta: Callable[[int], AttentionMetadata]) -> None:
        """Captures each bucket (largest first) over ``capture_meta(bucket)``: a step of that
        many tokens in free blocks, planned for the attention backend. A bucket whose warm runs
        do not fit in the memory the KV cache left is skipped: steps of its size run eagerly."""
        started = time.monotonic()
        reserved = torch.cuda.memory_reserved(self._device)
        pool = None
        side = torch.cuda.Stream(self._device)  # the warm runs' and the captures' stream
        too_large = []
        for bucket in progress(
            len(buckets), "capturing prompt graphs", "graphs", iterable=sorted(buckets, reverse=True)
        ):
            meta = capture_meta(bucket)
            try:
                self._warm(bucket, meta, side)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                too_large.append(bucket)
                continue
            self._buckets[bucket], pool = self._capture(bucket, meta, pool, side)
        self.buckets = sorted(self._buckets)
        torch.cuda.synchronize(self._device)
        if too_large:
            log.warning(
                "steps of %s tokens with prompt chunks run eagerly: their prompt graphs do not fit in the memory "
                "the KV cache leaves (KV_CACHE_MANAGER_NUM_GPU_BLOCKS lower leaves more)",
                ", ".join(map(str, sorted(too_large))),
            )
        if self.buckets:
            log.info(
                "captured prompt-step graphs for %d token counts (%d-%d) in %.1f s, holding %.0f MiB",
                len(self.buckets),
                self.buckets[0],
                self.buckets[-1],
                time.monotonic() - started,
                (torch.cuda.memory_reserved(self._device) - reserved) / 2**20,
            )

    def run(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        bucket: int,
        overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """The step's last-layer hidden states ``[tokens, hidden]``: its pieces replayed, its
        attention (planned and prepared for ``meta`` already) run between them; ``overrides``:
        its prompt prefixes' embeddings (index form)."""
        tokens = input_ids.shape[0]
        self._fill(input_ids, meta, bucket, overrides)
        captured = self._buckets[bucket]
        for piece, call in zip(captured.pieces, [*captured.attention, None], strict=True):
            piece.replay()
            if call is not None:
                self._attend_between(call, meta, tokens)
        assert self._hidden is not None
        return self._hidden[:tokens]
