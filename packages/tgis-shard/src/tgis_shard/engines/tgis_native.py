"""The ``tgis_native`` engine (alias ``hf_custom_tp``): model-family plugins, tensor parallel over
1..N ranks, padding-free (ragged) batches over a preallocated, block-paged KV cache.

Requests join and leave a running batch by block tables: concatenating batches merges lists,
pruning frees blocks; the cache itself is never reallocated or copied.
Encoder-decoder families (T5) are the exception: they run on the padded ``Seq2SeqLMEngine``.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoConfig, PretrainedConfig

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import resolve
from tgis_shard import memory
from tgis_shard.engines.base import (
    BatchState,
    Engine,
    GeneratedToken,
    ShardContext,
    UnsupportedModelError,
    generated_tokens,
    input_token_details,
    shard_info,
)
from tgis_shard.engines.hf_transformers import eos_token_ids
from tgis_shard.engines.seq2seq import Seq2SeqLMEngine
from tgis_shard.layers.distributed import TensorParallel, agree_with_rank0, init_tensor_parallel
from tgis_shard.layers.embedding import EmbeddingOverrides
from tgis_shard.layers.flex_paged import QUERY_TILE
from tgis_shard.layers.paged_attention import (
    BLOCK_SIZES,
    AttentionMetadata,
    BlockAllocator,
    PagedKVCache,
    blocks_for,
    choose_backend,
)
from tgis_shard.logits import BatchTokenChooser
from tgis_shard.prefixes import PrefixesUnsupportedError, PromptPrefix
from tgis_shard.weights import Weights

log = logging.getLogger(__name__)

# Prompt lengths of the warm-up batches. A compiled graph is specialised on each size that is 1
# (batch, query length, block-table width), so the batches cover one and several of each, and
# one to three query tiles, and a full tile, where the kernel choice changes (see NativeEngine.warm_up).
WARM_UP_PROMPT_LENGTHS = (
    [1],
    [2],
    [QUERY_TILE],
    [QUERY_TILE + 2],
    [2, 3],
    [QUERY_TILE, 2],
    [QUERY_TILE + 2, 1, 2],
    [2 * QUERY_TILE + 3, 5, 1, 1],
)
WARM_UP_DECODE_STEPS = 2
# Share of the memory left after loading the weights that the KV cache may take on a GPU.
GPU_CACHE_FRACTION = 0.85


class NativeCausalLM(Protocol):
    """What a model family's ``build(config, weights, tp)`` returns."""

    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        logit_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits of ``logit_rows`` (all tokens if None). A family that serves prompt prefixes
        also takes ``embedding_overrides`` (tgis_shard.layers.embedding) and says its embeddings'
        width as ``hidden_size``; others refuse prefixes."""
        ...


@dataclass
class NativeBatch(BatchState):
    """Requests decoding together: per row, its cache blocks and how many tokens they hold."""

    batch_id: int
    ids: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]  # tokens in the cache, not counting next_ids
    next_ids: torch.Tensor  # [batch]: the last chosen tokens, fed to the next step
    chooser: BatchTokenChooser
    allocator: BlockAllocator

    def _keep_rows(self, rows: list[int]) -> None:
        kept = set(rows)
        for row, blocks in enumerate(self.block_tables):
            if row not in kept:
                self.allocator.free(blocks)
        self.ids = [self.ids[r] for r in rows]
        self.block_tables = [self.block_tables[r] for r in rows]
        self.context_lens = [self.context_lens[r] for r in rows]
        self.next_ids = self.next_ids[torch.tensor(rows, device=self.next_ids.device)]
        self.chooser = self.chooser.select(rows)

    def release(self) -> None:
        for blocks in self.block_tables:
            self.allocator.free(blocks)
        self.block_tables = [[] for _ in self.ids]


class NativeEngine(Engine):
    def __init__(
        self,
        model: NativeCausalLM,
        ctx: ShardContext,
        tp: TensorParallel,
        config: PretrainedConfig,
        cache: PagedKVCache,
        eos_token_ids: list[int],
    ):
        self.model = model
        self.ctx = ctx
        self.tp = tp
        self.config = config
        self.cache = cache
        self.block_size = cache.block_size
        self.allocator = BlockAllocator(cache.num_blocks)
        self.eos_token_ids = eos_token_ids
        self._takes_prefixes = "embedding_overrides" in inspect.signature(model.forward).parameters
        self.prefixes = ctx.prefix_store(model.hidden_size if self._takes_prefixes else 0)

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        if not self._takes_prefixes:
            raise PrefixesUnsupportedError(
                f"the {self.config.model_type} model plugin does not support prompt prefixes (no embedding_overrides)"
            )
        return self.prefixes.get(prefix_id)

    def info(self) -> pb.InfoResponse:
        return shard_info(
            self.ctx,
            self.eos_token_ids,
            model_kind=pb.DECODER_ONLY,
            vocab_size=self.config.vocab_size,
            batch_padding=False,
            engine="tgis_native",
        )

    def _allocate(self, counts: Sequence[int]) -> list[list[int]]:
        tables: list[list[int]] = []
        try:
            for count in counts:
                tables.append(self.allocator.allocate(count))
        except Exception:
            for blocks in tables:
                self.allocator.free(blocks)
            raise
        return tables

    @torch.inference_mode()
    def prefill(self, batch: pb.Batch) -> tuple[list[GeneratedToken], NativeBatch]:
        device = self.ctx.device
        requests = list(batch.requests)
        prefixes = [self.prompt_prefix(r.prefix_id).input if r.prefix_id else None for r in requests]
        # A sequence is [prompt prefix, input tokens]; prefix positions hold placeholder ids whose
        # embeddings the prefix's replace.
        prefix_lengths = [0 if p is None else len(p) for p in prefixes]
        lengths = [p + len(r.input_ids) for p, r in zip(prefix_lengths, requests, strict=True)]
        tables = self._allocate([blocks_for(n, self.block_size) for n in lengths])
        try:
            input_ids = torch.tensor(
                [i for p, r in zip(prefix_lengths, requests, strict=True) for i in [0] * p + list(r.input_ids)],
                dtype=torch.long,
                device=device,
            )
            positions = torch.cat([torch.arange(n, device=device) for n in lengths])
            meta = AttentionMetadata.build(lengths, lengths, tables, self.block_size, device)
            ends = list(accumulate(lengths))
            want_inputs = any(r.details.input_tokens for r in requests)
            last_rows = torch.tensor([e - 1 for e in ends], device=device)
            overrides = EmbeddingOverrides.at(prefixes, [e - n for e, n in zip(ends, lengths, strict=True)], device)
            # Without prefixes the keyword stays out: families that take no overrides serve the rest.
            extra = {} if overrides is None else {"embedding_overrides": overrides}
            logits = self.model(input_ids, positions, self.cache, meta, None if want_inputs else last_rows, **extra)
            chooser = BatchTokenChooser.from_requests(
                requests, self.eos_token_ids, self.config.vocab_size, device, prompt_in_history=True
            )
            chosen = chooser.choose(logits[last_rows] if want_inputs else logits)
            next_ids = agree_with_rank0(chosen.token_ids)
        except Exception:
            for blocks in tables:
                self.allocator.free(blocks)
            raise
        state = NativeBatch(batch.id, [r.id for r in requests], tables, lengths, next_ids, chooser, self.allocator)
        tokens = generated_tokens(state.ids, chosen, chooser)
        if want_inputs:
            tokens = [
                replace(token, input_tokens=input_token_details(request, logits, ends[row]))
                if request.details.input_tokens
                else token
                for row, (token, request) in enumerate(zip(tokens, requests, strict=True))
            ]
        return tokens, state

    def concatenate(self, states: Sequence[BatchState]) -> NativeBatch:
        batches = [_native(s) for s in states]
        if len(batches) == 1:
            return batches[0]
        merged = NativeBatch(
            batches[0].batch_id,
            [rid for b in batches for rid in b.ids],
            [t for b in batches for t in b.block_tables],
            [n for b in batches for n in b.context_lens],
            torch.cat([b.next_ids for b in batches]),
            BatchTokenChooser.concatenate([b.chooser for b in batches]),
            self.allocator,
        )
        # The blocks change hands only now that nothing can fail: each is freed once, by its owner.
        for part in batches:
            part.ids, part.block_tables, part.context_lens = [], [], []
        return merged

    @torch.inference_mode()
    def decode(self, state: BatchState) -> list[GeneratedToken]:
        batch = _native(state)
        device = self.ctx.device
        # Each row's next token goes into the cache at position context_len.
        for row, length in enumerate(batch.context_lens):
            if length + 1 > len(batch.block_tables[row]) * self.block_size:
                batch.block_tables[row].extend(self.allocator.allocate(1))
        context = [n + 1 for n in batch.context_lens]
        meta = AttentionMetadata.build([1] * len(context), context, batch.block_tables, self.block_size, device)
        positions = torch.tensor(batch.context_lens, dtype=torch.long, device=device)
        logits = self.model(batch.next_ids, positions, self.cache, meta, None)
        chosen = batch.chooser.choose(logits)
        batch.next_ids = agree_with_rank0(chosen.token_ids)
        batch.context_lens = context
        return generated_tokens(batch.ids, chosen, batch.chooser)

    def memory_model(self) -> pb.MemoryModel | None:
        """The preallocated cache is the limit, counted in whole blocks; prefill activations live
        outside it, so a GPU caps prefill tokens by what remains free (measured)."""
        settings = self.ctx.memory_settings
        if settings.estimate == "off":
            return None
        per_token = memory.kv_bytes_per_token(
            self.model.num_layers, self.model.num_kv_heads, self.model.head_dim, self.ctx.dtype
        )
        model = pb.MemoryModel(
            limit_bytes=self.cache.num_blocks * self.block_size * per_token,
            bytes_per_token=per_token,
            block_size=self.block_size,
        )
        if settings.estimate == "auto" and self.ctx.device.type == "cuda":
            tokens = min(memory.MEASURE_TOKENS, settings.max_sequence_length - 1)
            linear, quadratic = memory.measured_prefill_bytes(self.ctx.device, self.measure_prefill, tokens)
            free = memory.free_bytes_for_batches(self.ctx.device, settings)
            # Activations live outside the cache: cap prefill tokens by what stays free, counting
            # the quadratic part at a full-length prompt.
            per_token = linear + quadratic * settings.max_sequence_length
            model.max_prefill_tokens = max(tokens, int(free // max(per_token, 1.0)))
            model.measured = True
        return model

    def warm_up(self) -> None:
        """Compiled attention (FlexAttention) builds a graph per new kind of shape. Steps of each
        kind here turn the sizes dynamic, so requests rarely wait for a compilation later."""
        if self.cache.backend != "flex":
            return
        longest = self.ctx.max_sequence_length - WARM_UP_DECODE_STEPS - 1
        for lengths in WARM_UP_PROMPT_LENGTHS:
            self.run_synthetic([min(n, longest) for n in lengths], WARM_UP_DECODE_STEPS)
        log.info("rank %d: attention compiled for %d kinds of step", self.tp.rank, len(WARM_UP_PROMPT_LENGTHS))

    @torch.inference_mode()
    def health_check(self) -> None:
        tables = self._allocate([1])
        try:
            device = self.ctx.device
            meta = AttentionMetadata.build([1], [1], tables, self.block_size, device)
            ids = torch.zeros(1, dtype=torch.long, device=device)
            logits = self.model(ids, torch.zeros(1, dtype=torch.long, device=device), self.cache, meta, None)
            if not torch.isfinite(logits).all():
                raise RuntimeError("health check forward pass produced non-finite logits")
        finally:
            self.allocator.free(tables[0])


def _native(state: BatchState) -> NativeBatch:
    if not isinstance(state, NativeBatch):
        raise TypeError(f"tgis_native cannot use a {type(state).__name__}")
    return state


def _cache_blocks(ctx: ShardContext, model: NativeCausalLM, block_size: int) -> int:
    """GPU: what fits in the memory left after the weights; CPU: max batch × max length."""
    if ctx.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(ctx.device)
        free -= ctx.memory_settings.reserved_bytes  # the prompt-prefix cache fills up later
        element = torch.empty((), dtype=ctx.dtype).element_size()
        per_block = 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * element
        return max(1, int(max(0, free) * GPU_CACHE_FRACTION) // per_block)
    return ctx.max_batch_size * blocks_for(ctx.max_sequence_length, block_size)


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config; a model_type transformers no longer knows (Falcon's RefinedWeb and
    RefinedWebModel checkpoints) comes back as a plain config with every key of config.json,
    for the family plugin registered under that name to read."""
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, KeyError):
        raw = json.loads((model_dir / "config.json").read_text())
        config = PretrainedConfig.from_dict(raw)
        config.model_type = raw.get("model_type", "")
        return config


def create_engine(ctx: ShardContext) -> Engine:
    """Builds the model family registered for the config's model_type, sharded over the ranks.

    Encoder-decoder families (T5) batch with padding: their model has transformers' seq2seq
    interface and runs on the padded ``Seq2SeqLMEngine``, without the paged cache.
    """
    config = load_config(ctx.model_dir)
    family = ctx.registry.model_family(config.model_type, "tgis_native")
    build = resolve(family.target)
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    tp = init_tensor_parallel(ctx.rank, ctx.world_size, ctx.device, ctx.master_addr, ctx.master_port)
    with Weights(ctx.model_dir, tp, ctx.dtype, ctx.device) as weights:
        model = build(config, weights, tp)
    if getattr(config, "is_encoder_decoder", False):
        return Seq2SeqLMEngine(model, ctx, eos_token_ids(ctx.model_dir, config), engine="tgis_native")
    backend = ctx.attention_backend or choose_backend(ctx.device, ctx.dtype, model.head_dim)
    block_size = BLOCK_SIZES[backend]
    blocks = _cache_blocks(ctx, model, block_size)
    if blocks < blocks_for(ctx.max_sequence_length, block_size):
        raise UnsupportedModelError(
            f"the KV cache holds {blocks * block_size} tokens, less than one sequence of MAX_SEQUENCE_LENGTH "
            f"{ctx.max_sequence_length}"
        )
    cache = PagedKVCache(
        model.num_layers, blocks, block_size, model.num_kv_heads, model.head_dim, ctx.dtype, ctx.device, backend
    )
    log.info(
        "rank %d/%d: %s KV cache of %d blocks × %d tokens (%s attention)",
        tp.rank,
        tp.world_size,
        family.model_type,
        blocks,
        block_size,
        backend,
    )
    return NativeEngine(model, ctx, tp, config, cache, eos_token_ids(ctx.model_dir, config))
