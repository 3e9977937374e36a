"""The ``hf_transformers`` engine for encoder-decoder LMs (T5, mT0, BART, ...).

The encoder runs once per request at prefill; each step then runs one decoder position for every
row. Requests join and leave a running batch as in the causal engine, with two padding regimes:

* the encoder side (hidden states, their mask, the cross-attention cache) is right-padded, so the
  prompt sits at columns ``0 .. len - 1`` exactly as when run alone (T5's relative buckets and
  BART's learned encoder positions see the same positions);
* the decoder side (self-attention cache and its mask) is left-padded, so every row's newest
  position is the last column, whatever step it joined at.

Left padding shifts a row's cache columns, not its positions: T5 derives positions from column
differences (unchanged), while decoders with absolute positions get each row's own position.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from tgis_proto import shard_pb2 as pb
from tgis_shard import pt2
from tgis_shard.engines import kv_cache
from tgis_shard.engines.base import ShardContext, UnsupportedModelError, shard_info
from tgis_shard.engines.hf_transformers import padded_memory_model
from tgis_shard.engines.padded import BatchState, PaddedEngine, kept_columns
from tgis_shard.layers.distributed import SINGLE, TensorParallel, agree_with_rank0
from tgis_shard.layers.embedding import EmbeddingOverrides
from tgis_shard.prefixes import PromptPrefix
from tgis_shard.sampler import Choice, GeneratedToken, Sampler


@dataclass
class Seq2SeqLMBatch(BatchState):
    """Requests decoding together. The decoder cache covers every decoder token except ``decoder_input_ids``."""

    ids: list[int]
    encoder_hidden: torch.Tensor  # [batch, encoder positions, hidden], right-padded
    encoder_mask: torch.Tensor  # [batch, encoder positions], right-padded
    decoder_input_ids: torch.Tensor  # [batch, 1]: the last chosen tokens, fed to the next step
    decoder_mask: torch.Tensor  # [batch, cached decoder positions], left-padded
    cache: EncoderDecoderCache

    def _keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, device=self.decoder_input_ids.device)
        encoder_mask = self.encoder_mask[index]
        decoder_mask = self.decoder_mask[index]
        # Encoder columns right of the longest remaining prompt, and decoder columns left of the
        # longest remaining decoder sequence, hold only padding now.
        keep_first = kept_columns(int(encoder_mask.sum(dim=1).max()), encoder_mask.shape[1])
        keep_last = kept_columns(int(decoder_mask.sum(dim=1).max()), decoder_mask.shape[1])
        kv_cache.select_rows(self.cache.self_attention_cache, index, keep_last)
        kv_cache.select_rows_right_padded(self.cache.cross_attention_cache, index, keep_first)
        self.ids = [self.ids[i] for i in rows]
        self.encoder_hidden = self.encoder_hidden[index, :keep_first]
        self.encoder_mask = encoder_mask[:, :keep_first]
        self.decoder_input_ids = self.decoder_input_ids[index]
        self.decoder_mask = decoder_mask[:, -keep_last:]


class _RowPositions:
    """Feeds per-row ids to a decoder's absolute position embedding (BART, mBART, Marian, Pegasus).

    Those decoders embed position ``cache length + i`` for every row and take no position ids in
    ``forward``; a row that joined a running batch later is at a smaller position than the
    left-padded cache is long. Their ``embed_positions`` module does take ``position_ids``, so
    hooks substitute each row's own positions while a step runs (and restore [batch, seq, hidden]:
    BART's module adds a leading axis to the ids it is given).
    """

    def __init__(self, module: nn.Module):
        self._signature = inspect.signature(module.forward)
        self._ids: torch.Tensor | None = None
        module.register_forward_pre_hook(self._before, with_kwargs=True)
        module.register_forward_hook(self._after)

    @contextmanager
    def use(self, position_ids: torch.Tensor) -> Iterator[None]:
        self._ids = position_ids
        try:
            yield
        finally:
            self._ids = None

    def _before(
        self, _module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[tuple[object, ...], dict[str, object]] | None:
        if self._ids is None:
            return None
        bound = self._signature.bind(*args, **kwargs)
        bound.arguments["position_ids"] = self._ids
        return bound.args, bound.kwargs

    def _after(self, _module: nn.Module, _args: tuple[object, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._ids is None:
            return None
        return output.reshape(*self._ids.shape, output.shape[-1])


class Seq2SeqLMEngine(PaddedEngine):
    def __init__(
        self,
        model: PreTrainedModel,
        ctx: ShardContext,
        eos_token_ids: list[int],
        engine: str = "hf_transformers",
        tp: TensorParallel = SINGLE,
    ):
        super().__init__()
        # ``model`` may also be a tensor-parallel model with the same interface (tgis_native's T5):
        # ``tp`` is then its rank's group.
        self.model = model
        self.tp = tp
        self.engine = engine
        self.ctx = ctx
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self.decoder_start_token_id = _decoder_start_token_id(model)
        # mBART-50 and NLLB make the first generated token the target language's code.
        self.forced_bos_token_id = _generation_setting(model, "forced_bos_token_id")
        self.vocab_size = model.config.get_text_config(decoder=True).vocab_size
        # Caches are sized from the decoder's own config: T5's top-level config counts the encoder's
        # layers (num_layers), which differ from num_decoder_layers in some checkpoints.
        self._decoder_config = model.get_decoder().config
        accepted = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache (5.2x); both spellings are in the field.
        self._cache_kwarg = "cache" if "cache" in accepted else "past_key_values"
        self._takes_decoder_position_ids = "decoder_position_ids" in accepted
        self._row_positions: _RowPositions | None = None
        if not self._takes_decoder_position_ids:
            self._row_positions = _absolute_positions(model, engine)
        # Prompt prefixes go in front of the encoder's input and of the decoder start token.
        self._takes_embeds = (
            "inputs_embeds" in inspect.signature(model.get_encoder().forward).parameters
            and "decoder_inputs_embeds" in accepted
        )
        self._embeddings = model.get_input_embeddings()  # None where a graph embeds ids itself (ONNX)
        hidden = self._embeddings.weight.shape[-1] if self._embeddings is not None else 0
        self.prefixes = ctx.prefix_store(hidden, encoder_decoder=True)
        self.sampler = Sampler(ctx.max_batch_size, self.vocab_size, eos_token_ids, ctx.device)
        self._compiled_forward = self.compiled(model.forward)

    def prompt_prefix(self, prefix_id: str) -> PromptPrefix:
        if not self._takes_embeds:
            return super().prompt_prefix(prefix_id)
        return self.prefixes.get(prefix_id)

    def history(self, request: pb.Request) -> Sequence[int]:
        return ()  # the repetition penalty covers decoder tokens only: the prompt is the encoder's input

    def info(self) -> pb.InfoResponse:
        return shard_info(
            self,
            self.eos_token_ids,
            model_kind=pb.ENCODER_DECODER,
            vocab_size=self.vocab_size,
            batch_padding=True,
            name=self.engine,
        )

    def _decoder_step(
        self,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor,
        decoder_input: dict[str, torch.Tensor],
        decoder_mask: torch.Tensor,
        cache: EncoderDecoderCache,
    ) -> torch.Tensor:
        """New decoder positions per row (``decoder_input_ids`` or ``decoder_inputs_embeds``);
        ``decoder_mask`` covers the cached and the new ones. Returns the last position's [batch, vocab] logits."""
        new = next(iter(decoder_input.values())).shape[1]
        # A position counts the real decoder tokens before it; rows are left-padded, so the new
        # columns' positions end at the row's count. (A tensor of its own: a view of the mask
        # would have strides that vary with its width, a compiled step each under PT2_COMPILE.)
        real = decoder_mask.sum(dim=1, keepdim=True)
        positions = (real - new + torch.arange(new, device=decoder_mask.device)).clamp(min=0)
        kwargs: dict[str, object] = {self._cache_kwarg: cache}
        if self._takes_decoder_position_ids:
            kwargs["decoder_position_ids"] = positions
        row_positions = self._row_positions.use(positions) if self._row_positions is not None else nullcontext()
        # A prompt prefix's decoder embeddings (rare) run eagerly: one kind of step fewer to compile.
        compiled = self._compiled_forward if "decoder_input_ids" in decoder_input else None
        if compiled is not None:
            # Rows kept or merged leave views and copies of several layouts: compiled, one.
            kv_cache.make_dense(cache.cross_attention_cache)
            encoder_hidden, encoder_mask, decoder_mask = map(pt2.dense, (encoder_hidden, encoder_mask, decoder_mask))
        with row_positions:
            out = (compiled or self.model)(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                attention_mask=encoder_mask,
                decoder_attention_mask=decoder_mask,
                use_cache=True,
                **decoder_input,
                **kwargs,
            )
        return out.logits[:, -1, :]

    def _encoder_input(
        self, requests: Sequence[pb.Request], prefixes: Sequence[torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Right-padded encoder rows [prompt prefix, input tokens, padding] and their mask."""
        device = self.ctx.device
        starts = [0 if p is None else len(p) for p in prefixes]
        lengths = [start + len(r.input_ids) for start, r in zip(starts, requests, strict=True)]
        input_ids = torch.full((len(lengths), max(*lengths, self.min_width)), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (request, start, length) in enumerate(zip(requests, starts, lengths, strict=True)):
            input_ids[row, start:length] = torch.tensor(list(request.input_ids), dtype=torch.long)
            mask[row, :length] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        overrides = EmbeddingOverrides.at(prefixes, [row * input_ids.shape[1] for row in range(len(lengths))], device)
        if overrides is None:
            return {"input_ids": input_ids}, mask
        return {"inputs_embeds": overrides.apply(self._embeddings(input_ids))}, mask

    def _first_decoder_input(
        self, prefixes: Sequence[torch.Tensor | None]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Left-padded decoder rows [decoder prefix, start token] and their mask."""
        device = self.ctx.device
        lengths = [1 + (0 if p is None else len(p)) for p in prefixes]
        width = max(*lengths, self.min_width)
        ids = torch.full((len(lengths), width), self.decoder_start_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, length in enumerate(lengths):
            mask[row, width - length :] = 1
        overrides = EmbeddingOverrides.at(prefixes, [row * width + width - n for row, n in enumerate(lengths)], device)
        if overrides is None:
            return {"decoder_input_ids": ids}, mask
        return {"decoder_inputs_embeds": overrides.apply(self._embeddings(ids))}, mask

    @torch.inference_mode()
    def prefill(self, requests: Sequence[pb.Request]) -> tuple[list[GeneratedToken], Seq2SeqLMBatch, Choice]:
        prefixes = [self.prompt_prefix(r.prefix_id) if r.prefix_id else None for r in requests]
        encoder_input, encoder_mask = self._encoder_input(requests, [p and p.input for p in prefixes])
        encoder_hidden = self.model.get_encoder()(**encoder_input, attention_mask=encoder_mask).last_hidden_state
        decoder_input, decoder_mask = self._first_decoder_input([p and p.decoder for p in prefixes])
        # The cross-attention cache gets no config: the decoder's sliding-window layer types (T5Gemma)
        # describe its self-attention only; cross-attention always sees the whole encoder output.
        self_attention = kv_cache.roomy_cache(self._decoder_config, self.cache_room_tokens)
        cache = EncoderDecoderCache(self_attention, DynamicCache())
        logits = self._decoder_step(encoder_hidden, encoder_mask, decoder_input, decoder_mask, cache)
        if self.forced_bos_token_id is not None:
            # As generate() does: every other token impossible, whatever the sampling settings.
            forced = torch.full_like(logits, -math.inf)
            forced[:, self.forced_bos_token_id] = 0.0
            logits = forced
        ids = [r.id for r in requests]
        choice = self.sampler.choose(logits, ids)
        agree_with_rank0(choice.token_ids)  # tensor-parallel T5 (tgis_native)
        state = Seq2SeqLMBatch(
            ids=ids,
            encoder_hidden=encoder_hidden,
            encoder_mask=encoder_mask,
            decoder_input_ids=choice.token_ids.unsqueeze(1),
            decoder_mask=decoder_mask,
            cache=cache,
        )
        tokens = choice.generated_tokens()
        return (
            [
                replace(token, input_tokens=_unscored_input_tokens(request)) if request.details.input_tokens else token
                for token, request in zip(tokens, requests, strict=True)
            ],
            state,
            choice,
        )

    def concatenate(self, states: Sequence[BatchState]) -> Seq2SeqLMBatch:
        batches = [_seq2seq(s) for s in states]
        if len(batches) == 1:
            return batches[0]
        encoder_length = max(b.encoder_mask.shape[1] for b in batches)
        decoder_length = max(b.decoder_mask.shape[1] for b in batches)
        first = batches[0]
        kv_cache.concatenate([b.cache.self_attention_cache for b in batches], decoder_length)
        kv_cache.concatenate_right_padded([b.cache.cross_attention_cache for b in batches], encoder_length)
        first.encoder_hidden = torch.cat(
            [F.pad(b.encoder_hidden, (0, 0, 0, encoder_length - b.encoder_hidden.shape[1])) for b in batches]
        )
        first.encoder_mask = torch.cat(
            [F.pad(b.encoder_mask, (0, encoder_length - b.encoder_mask.shape[1])) for b in batches]
        )
        first.decoder_mask = torch.cat(
            [F.pad(b.decoder_mask, (decoder_length - b.decoder_mask.shape[1], 0)) for b in batches]
        )
        first.ids = [rid for b in batches for rid in b.ids]
        first.decoder_input_ids = torch.cat([b.decoder_input_ids for b in batches])
        return first

    @torch.inference_mode()
    def decode(self, state: BatchState) -> list[GeneratedToken]:
        batch = _seq2seq(state)
        ones = torch.ones((len(batch.ids), 1), dtype=batch.decoder_mask.dtype, device=self.ctx.device)
        decoder_mask = torch.cat([batch.decoder_mask, ones], dim=1)
        decoder_input = {"decoder_input_ids": batch.decoder_input_ids}
        kv_cache.reserve(batch.cache.self_attention_cache, decoder_mask.shape[1])
        try:
            logits = self._decoder_step(
                batch.encoder_hidden, batch.encoder_mask, decoder_input, decoder_mask, batch.cache
            )
            choice = self.sampler.choose(logits, batch.ids)
            agree_with_rank0(choice.token_ids)
            tokens = choice.generated_tokens()
        except Exception:
            # Layers that took this step's keys give them back: the batch is as it was.
            kv_cache.truncate(batch.cache.self_attention_cache, batch.decoder_mask.shape[1])
            raise
        choice.commit()
        batch.decoder_mask = decoder_mask
        batch.decoder_input_ids = choice.token_ids.unsqueeze(1)
        return tokens

    def memory_model(self) -> pb.MemoryModel | None:
        return padded_memory_model(self, self.model.config, self.tp)

    @torch.inference_mode()
    def health_check(self) -> None:
        ids = torch.tensor([[self.pad_token_id]], device=self.ctx.device)
        start = torch.tensor([[self.decoder_start_token_id]], device=self.ctx.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=start, use_cache=False)
        if not torch.isfinite(out.logits).all():
            raise RuntimeError("health check forward pass produced non-finite logits")


def _seq2seq(state: BatchState) -> Seq2SeqLMBatch:
    if not isinstance(state, Seq2SeqLMBatch):
        raise TypeError(f"hf_transformers (encoder-decoder) cannot use a {type(state).__name__}")
    return state


def _unscored_input_tokens(request: pb.Request) -> tuple[pb.Token, ...]:
    """The prompt feeds the encoder, which predicts nothing: ids without logprobs."""
    return tuple(pb.Token(id=i, logprob=float("nan")) for i in request.input_ids)


def _generation_setting(model: PreTrainedModel, name: str) -> int | None:
    """A token id as ``generate`` finds it: in the generation config, else the model config."""
    for source in (model.generation_config, model.config):
        value = getattr(source, name, None)
        if value is not None:
            return int(value)
    return None


def _decoder_start_token_id(model: PreTrainedModel) -> int:
    """What ``generate`` starts the decoder with: decoder_start_token_id, else BOS."""
    for name in ("decoder_start_token_id", "bos_token_id"):
        value = _generation_setting(model, name)
        if value is not None:
            return value
    raise UnsupportedModelError("the model config names neither a decoder_start_token_id nor a bos_token_id")


def _absolute_positions(model: PreTrainedModel, engine: str) -> _RowPositions | None:
    """Hooks for decoders with absolute positions; None for T5-style relative position buckets.

    Anything else would silently give rows that joined a running batch wrong positions, so it is
    refused rather than guessed.
    """
    module = getattr(model.get_decoder(), "embed_positions", None)
    if module is not None and "position_ids" in inspect.signature(module.forward).parameters:
        return _RowPositions(module)
    config = model.config.get_text_config(decoder=True)
    if module is None and getattr(config, "relative_attention_num_buckets", None) is not None:
        return None
    raise UnsupportedModelError(
        f"{type(model).__name__}: {engine} cannot give each row of a batch its own decoder positions"
    )
