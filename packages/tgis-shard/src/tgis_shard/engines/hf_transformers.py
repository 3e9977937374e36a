"""The ``hf_transformers`` engine: any transformers causal LM, batched with left padding (seq2seq: see seq2seq.py).

Batches follow continuous batching (``engines.padded``): a prefilled batch is concatenated into
the running one (caches and masks left-padded to a common length) and finished requests are
pruned, trimming columns that only padding still uses.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DynamicCache,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from tgis_proto import shard_pb2 as pb
from tgis_shard import memory
from tgis_shard.engines import hf_paged, kv_cache
from tgis_shard.engines.base import (
    Engine,
    ShardContext,
    UnsupportedModelError,
    input_token_details,
    shard_info,
)
from tgis_shard.engines.padded import BatchState, PaddedEngine, kept_columns
from tgis_shard.layers.distributed import SINGLE, TensorParallel
from tgis_shard.layers.embedding import EmbeddingOverrides
from tgis_shard.prefixes import PromptPrefix
from tgis_shard.sampler import Choice, GeneratedToken, Sampler

log = logging.getLogger(__name__)


@dataclass
class CausalLMBatch(BatchState):
    """Requests decoding together. The cache covers every token except ``input_ids``."""

    ids: list[int]
    input_ids: torch.Tensor  # [batch, 1]: the last chosen tokens, fed to the next step
    attention_mask: torch.Tensor  # [batch, cached positions], left-padded
    position_ids: torch.Tensor  # [batch, 1]: position of input_ids in each sequence
    cache: DynamicCache

    def _keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.input_ids.device)
        mask = self.attention_mask[index]
        # Columns left of the longest remaining sequence hold only padding now.
        keep_last = kept_columns(int(mask.sum(dim=1).max()), mask.shape[1])
        kv_cache.select_rows(self.cache, index, keep_last)
        self.ids = [self.ids[i] for i in rows]
        self.input_ids = self.input_ids[index]
        self.attention_mask = mask[:, -keep_last:]
        self.position_ids = self.position_ids[index]


class CausalLMEngine(PaddedEngine):
    def __init__(
        self, model: PreTrainedModel, ctx: ShardContext, eos_token_ids: list[int], engine: str = "hf_transformers"
    ):
        super().__init__()
        self.model = model
        self.engine = engine
        self.ctx = ctx
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        accepted = inspect.signature(model.forward).parameters
        # Some architectures (BLOOM's ALiBi) derive positions from the mask and take no ids.
        self._takes_position_ids = "position_ids" in accepted
        self._takes_logits_to_keep = "logits_to_keep" in accepted
        # transformers renamed past_key_values to cache (5.2x); both spellings are in the field.
        self._cache_kwarg = "cache" if "cache" in accepted else "past_key_values"
        self._embeddings = model.get_input_embeddings()  # None where a graph embeds ids itself (ONNX)
        self.prefixes = ctx.prefix_store(self._embeddings.weight.shape[-1] if self._embeddings is not None else 0)
        self.sampler = Sampler(ctx.max_batch_size, model.config.vocab_size, eos_token_ids, ctx.device)
        self._compiled_forward = self.compiled(model.forward)

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        return self.prefixes.get(prefix_id)

    def history(self, request: pb.Request) -> Sequence[int]:
        return request.input_ids

    def info(self) -> pb.InfoResponse:
        return shard_info(
            self,
            self.eos_token_ids,
            model_kind=pb.DECODER_ONLY,
            vocab_size=self.model.config.vocab_size,
            batch_padding=True,
            name=self.engine,
        )

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        last_only: bool,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, object] = {}
        if inputs_embeds is None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = inputs_embeds
        if self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:
            # The positions as a tensor, and two of them where a prompt has two, not a count: a
            # prefill for its last logits and one for every position's (input-token details) are
            # then one kind of compiled step (PT2_COMPILE; torch specialises sizes of 1).
            width = input_ids.shape[1]
            keep = min(width, 2) if last_only else width
            kwargs["logits_to_keep"] = torch.arange(width - keep, width, device=input_ids.device)
        kwargs[self._cache_kwarg] = cache
        # A prompt prefix's embeddings (rare) run eagerly: one kind of step fewer to compile.
        compiled = self._compiled_forward if inputs_embeds is None else None
        out = (compiled or self.model)(attention_mask=attention_mask, use_cache=True, **kwargs)
        return out.logits

    @torch.inference_mode()
    def prefill(self, requests: Sequence[pb.Request]) -> tuple[list[GeneratedToken], CausalLMBatch, Choice]:
        device = self.ctx.device
        prefixes = [self.prompt_prefix(r.prefix_id).input if r.prefix_id else None for r in requests]
        # A row is [padding, prompt prefix, input tokens]: the prefix is part of the sequence.
        prefix_lengths = [0 if p is None else len(p) for p in prefixes]
        lengths = [len(r.input_ids) + n for r, n in zip(requests, prefix_lengths, strict=True)]
        width = max(*lengths, self.min_width)
        input_ids = torch.full((len(lengths), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(lengths), width), dtype=torch.long)
        for row, (request, length) in enumerate(zip(requests, lengths, strict=True)):
            input_ids[row, width - len(request.input_ids) :] = torch.tensor(list(request.input_ids), dtype=torch.long)
            mask[row, width - length :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        starts = [row * width + width - length for row, length in enumerate(lengths)]
        overrides = EmbeddingOverrides.at(prefixes, starts, device)
        inputs_embeds = None if overrides is None else overrides.apply(self._embeddings(input_ids))
        cache = kv_cache.roomy_cache(self.model.config, self.cache_room_tokens, self.ctx.max_sequence_length)
        want_inputs = any(r.details.input_tokens for r in requests)
        logits = self._forward(input_ids, mask, position_ids, cache, not want_inputs, inputs_embeds)
        ids = [r.id for r in requests]
        choice = self.sampler.choose(logits[:, -1, :], ids)
        state = CausalLMBatch(
            ids=ids,
            input_ids=choice.token_ids.unsqueeze(1),
            attention_mask=mask,
            position_ids=position_ids[:, -1:] + 1,
            cache=cache,
        )
        tokens = choice.generated_tokens()
        if want_inputs:
            tokens = [
                replace(
                    token,
                    input_tokens=input_token_details(
                        request.input_ids, request.details.top_n, logits[row, width - length :], 0, prefix_length
                    ),
                )
                if request.details.input_tokens
                else token
                for row, (token, request, length, prefix_length) in enumerate(
                    zip(tokens, requests, lengths, prefix_lengths, strict=True)
                )
            ]
        return tokens, state, choice

    def concatenate(self, states: Sequence[BatchState]) -> CausalLMBatch:
        batches = [_causal(s) for s in states]
        if len(batches) == 1:
            return batches[0]
        length = max(b.attention_mask.shape[1] for b in batches)
        first = batches[0]
        first.cache = kv_cache.concatenate([b.cache for b in batches], length)
        first.attention_mask = torch.cat(
            [torch.nn.functional.pad(b.attention_mask, (length - b.attention_mask.shape[1], 0)) for b in batches]
        )
        first.ids = [rid for b in batches for rid in b.ids]
        first.input_ids = torch.cat([b.input_ids for b in batches])
        first.position_ids = torch.cat([b.position_ids for b in batches])
        return first

    @torch.inference_mode()
    def decode(self, state: BatchState) -> list[GeneratedToken]:
        batch = _causal(state)
        ones = torch.ones((len(batch.ids), 1), dtype=batch.attention_mask.dtype, device=self.ctx.device)
        mask = torch.cat([batch.attention_mask, ones], dim=1)
        kv_cache.reserve(batch.cache, mask.shape[1])
        try:
            logits = self._forward(batch.input_ids, mask, batch.position_ids, batch.cache, last_only=True)
            choice = self.sampler.choose(logits[:, -1, :], batch.ids)
            tokens = choice.generated_tokens()
        except Exception:
            # Layers that took this step's keys give them back: the batch is as it was.
            kv_cache.truncate(batch.cache, batch.attention_mask.shape[1])
            raise
        choice.commit()
        batch.attention_mask = mask
        batch.input_ids = choice.token_ids.unsqueeze(1)
        batch.position_ids = batch.position_ids + 1
        return tokens

    def memory_model(self) -> pb.MemoryModel | None:
        return padded_memory_model(self, self.model.config)

    @torch.inference_mode()
    def health_check(self) -> None:
        ids = torch.tensor([[self.pad_token_id]], device=self.ctx.device)
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        if not torch.isfinite(logits).all():
            raise RuntimeError("health check forward pass produced non-finite logits")


def _causal(state: BatchState) -> CausalLMBatch:
    if not isinstance(state, CausalLMBatch):
        raise TypeError(f"hf_transformers cannot use a {type(state).__name__}")
    return state


def padded_memory_model(engine: PaddedEngine, config: object, tp: TensorParallel = SINGLE) -> pb.MemoryModel | None:
    """Memory of engines whose batches pad to the longest request and grow a dynamic cache with
    the engine's ``cache_room_tokens`` positions of room per row; under tensor parallelism the
    limit of the rank with the least memory."""
    ctx = engine.ctx
    cache_room_tokens = engine.cache_room_tokens
    settings = ctx.memory_settings
    if settings.estimate == "off":
        return None
    # Under tensor parallelism (tgis_native's T5) each rank caches only its heads.
    if settings.estimate == "manual" or ctx.device.type != "cuda":
        kv_bytes = memory.config_kv_bytes_per_token(config, ctx.dtype) / ctx.world_size
        return memory.synthesised(settings, kv_bytes, cache_room_tokens=cache_room_tokens)
    tokens = min(memory.MEASURE_TOKENS, settings.max_sequence_length - 1)
    linear, quadratic = memory.measured_prefill_bytes(ctx.device, engine.measure_prefill, tokens)
    rows = min(memory.DECODE_PROBE_ROWS, settings.max_batch_size)
    probe_tokens = max(1, min(memory.DECODE_PROBE_TOKENS, settings.max_sequence_length - 2))
    decode = memory.measured_decode_bytes_per_token(
        ctx.device, engine.measure_decode, rows, probe_tokens, cache_room_tokens
    )
    # The config's count is the floor: a small probe can miss transients that grow with the batch.
    counted = memory.config_decode_bytes_per_token(config, ctx.dtype) / ctx.world_size
    return pb.MemoryModel(
        limit_bytes=tp.min_over_ranks(int(memory.free_bytes_for_batches(ctx.device, settings))),
        bytes_per_token=max(decode, counted),
        prefill_bytes_per_token=linear,
        prefill_quadratic_bytes=quadratic,
        block_size=1,
        measured=True,
        cache_room_tokens=cache_room_tokens,
    )


def eos_token_ids(model_dir: object, config: object) -> list[int]:
    """EOS ids from generation_config.json (which may list several), else from config.json."""
    try:
        eos = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def create_engine(ctx: ShardContext) -> Engine:
    """Loads the model from its folder (never from a hub) onto the shard's device."""
    return _load_engine(ctx, "hf_transformers")


def create_sdpa_engine(ctx: ShardContext) -> Engine:
    """``hf_optimum_bt``: what optimum's BetterTransformer did (fused attention kernels) is
    transformers' SDPA attention now; this engine requires it instead of falling back to eager."""
    return _load_engine(ctx, "hf_optimum_bt", attn_implementation="sdpa")


def _pages_its_cache(ctx: ShardContext, config: PretrainedConfig) -> bool:
    """A causal LM runs on the paged cache (``engines.hf_paged``) on a GPU, or wherever an
    attention backend of ours is asked for, unless transformers' model cannot; the log says which."""
    if not ctx.hf_paged or (ctx.device.type != "cuda" and ctx.attention_backend is None):
        return False
    reason = hf_paged.unsupported(config, ctx.max_sequence_length)
    if reason is None:
        log.info("hf_transformers: the model runs on the paged KV cache with tgis_native's steps")
        return True
    log.info("hf_transformers: padded batches in transformers' own cache, not the paged cache: %s", reason)
    return False


def _load_engine(ctx: ShardContext, engine: str, attn_implementation: str | None = None) -> Engine:
    if ctx.world_size != 1:
        raise UnsupportedModelError(
            f"{engine} runs on one device; use DEPLOYMENT_FRAMEWORK=tgis_native to shard a model"
        )
    config = AutoConfig.from_pretrained(ctx.model_dir, local_files_only=True)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    paged = not seq2seq and attn_implementation is None and _pages_its_cache(ctx, config)
    if paged:
        attn_implementation = hf_paged.ATTENTION
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    started = time.monotonic()
    log.info("loading %s with transformers (%s)", ctx.model_dir, auto.__name__)
    try:
        model = auto.from_pretrained(ctx.model_dir, dtype=ctx.dtype, local_files_only=True, **options)
    except ValueError as e:
        if attn_implementation is None:
            raise
        raise UnsupportedModelError(f"{engine} needs {attn_implementation} attention: {e}") from e
    model = model.to(ctx.device).eval()
    log.info("loaded %s in %.1f s", ctx.model_dir, time.monotonic() - started)
    eos = eos_token_ids(ctx.model_dir, config)
    if paged:
        # Imported here: tgis_native imports this module.
        from tgis_shard.engines.tgis_native import paged_engine

        paged_lm = hf_paged.TransformersPagedLM(model, ctx.max_sequence_length)
        # Transformers' forward pass may read the device from the host somewhere, which a capture refuses.
        fallback = "HF_PAGED_CACHE=false keeps transformers' padded batches"
        return paged_engine(ctx, paged_lm, SINGLE, config, type(model).__name__, engine, capture_hint=fallback)
    if seq2seq:
        # Imported here: the seq2seq engine reuses this module's helpers.
        from tgis_shard.engines.seq2seq import Seq2SeqLMEngine

        return Seq2SeqLMEngine(model, ctx, eos, engine=engine)
    return CausalLMEngine(model, ctx, eos, engine=engine)
