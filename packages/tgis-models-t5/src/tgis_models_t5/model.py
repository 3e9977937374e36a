"""T5 as tensor-parallel blocks (T5 1.0, T5 1.1 / flan-t5, mT5 / mT0).

encoder: embedding → N × (RMSNorm → self-attention → RMSNorm → feed-forward) → RMSNorm
decoder: embedding → M × (RMSNorm → causal self-attention → RMSNorm → cross-attention
         → RMSNorm → feed-forward) → RMSNorm → LM head

Attention scores are not scaled; instead a learned bias per head and relative-distance bucket is
added (bidirectional buckets in the encoder, backward-only in the decoder). Only the first layer
of each stack stores the table and every layer uses it. Heads (and their bias columns) and
feed-forward columns are split across ranks: one all-reduce per attention and feed-forward block.

Encoder-decoder requests batch with padding, so the model presents transformers' seq2seq
interface (``get_encoder``, ``get_decoder``, ``forward`` with an ``EncoderDecoderCache``) and
tgis_shard's ``Seq2SeqLMEngine`` runs it as it runs any transformers encoder-decoder.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, GenerationConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from tgis_shard.engines.base import UnsupportedModelError
from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgis_shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgis_shard.layers.norm import RMSNorm
from tgis_shard.weights import Weights

# Checkpoints name the shared embedding differently depending on how tied tensors were saved.
EMBEDDING_NAMES = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def relative_buckets(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each ``key position - query position``: exact for short distances, then
    logarithmically wider up to ``max_distance``; bidirectional buckets give keys after the query
    the upper half, backward-only ones treat every later key as distance 0."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # Distances below ``exact`` make log() negative or -inf; torch.where discards those lanes.
    log_scaled = torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    wide = (exact + log_scaled.long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, wide)


class RelativePositionBias(nn.Module):
    """This rank's heads' columns of the learned ``[buckets, heads]`` bias table."""

    def __init__(self, config: PretrainedConfig, weights: Weights, name: str, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(weights.get_heads(name, 1, config.num_heads, 1), requires_grad=False)
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance

    def forward(self, query_length: int, key_length: int, past: int) -> torch.Tensor:
        """[1, heads, query_length, key_length] for queries at ``past ..`` over keys at ``0 ..``."""
        device = self.weight.device
        queries = torch.arange(past, past + query_length, device=device)
        keys = torch.arange(key_length, device=device)
        relative = keys[None, :] - queries[:, None]
        buckets = relative_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1).unsqueeze(0)


def _split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, seq, heads × head_dim] → [batch, heads, seq, head_dim], the cache's layout."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Unscaled attention with an additive ``bias`` (position bias and masks); [batch, seq, heads × head_dim]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    return out.transpose(1, 2).flatten(2)


def _padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [batch, keys] 1/0 mask as an additive bias: 0 where attended, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)


class SelfAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, weights: Weights, prefix: str, tp: TensorParallel, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = config.d_kv
        names = (f"{prefix}.q", f"{prefix}.k", f"{prefix}.v")
        self.qkv = ColumnParallelLinear.load_qkv(
            weights, names, config.num_heads, config.num_heads, config.d_kv, bias=False
        )
        self.o = RowParallelLinear.load(weights, f"{prefix}.o", False, tp)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        q, k, v = (_split_heads(x, self.head_dim) for x in self.qkv(hidden).chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        return self.o(_attend(q, k, v, bias))


class CrossAttention(nn.Module):
    """Decoder queries over the encoder output, whose keys and values are projected once per request."""

    def __init__(self, config: PretrainedConfig, weights: Weights, prefix: str, tp: TensorParallel, layer: int):
        super().__init__()
        self.layer = layer
        self.head_dim = config.d_kv
        self.q = ColumnParallelLinear.load(weights, f"{prefix}.q", False)
        self.kv = ColumnParallelLinear.load_fused(weights, [f"{prefix}.k", f"{prefix}.v"], False)
        self.o = RowParallelLinear.load(weights, f"{prefix}.o", False, tp)

    def forward(
        self, hidden: torch.Tensor, encoder_hidden: torch.Tensor, bias: torch.Tensor, cache: EncoderDecoderCache | None
    ) -> torch.Tensor:
        q = _split_heads(self.q(hidden), self.head_dim)
        if cache is not None and cache.is_updated.get(self.layer):
            stored = cache.cross_attention_cache.layers[self.layer]
            k, v = stored.keys, stored.values
        else:
            k, v = (_split_heads(x, self.head_dim) for x in self.kv(encoder_hidden).chunk(2, dim=-1))
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, self.layer)
                cache.is_updated[self.layer] = True
        return self.o(_attend(q, k, v, bias))


class FeedForward(nn.Module):
    """``wo(act(wi x))`` (T5 1.0) or ``wo(act(wi_0 x) · wi_1 x)`` (gated: T5 1.1, mT5)."""

    def __init__(self, config: PretrainedConfig, weights: Weights, prefix: str, tp: TensorParallel):
        super().__init__()
        self.gated = config.is_gated_act
        inputs = [f"{prefix}.wi_0", f"{prefix}.wi_1"] if self.gated else [f"{prefix}.wi"]
        self.wi = ColumnParallelLinear.load_fused(weights, inputs, False)
        self.wo = RowParallelLinear.load(weights, f"{prefix}.wo", False, tp)
        self.act = ACT2FN[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, linear = self.wi(x).chunk(2, dim=-1)
            return self.wo(self.act(gate) * linear)
        return self.wo(self.act(self.wi(x)))


def _keep_finite(hidden: torch.Tensor) -> torch.Tensor:
    """T5 1.1's residual stream can overflow float16; transformers clamps it, so clamping here
    keeps the same tokens instead of infinities."""
    if hidden.dtype != torch.float16:
        return hidden
    limit = torch.finfo(torch.float16).max - 1000
    return hidden.clamp(-limit, limit)


class EncoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, weights: Weights, tp: TensorParallel, layer: int):
        super().__init__()
        prefix = f"encoder.block.{layer}.layer"
        eps = config.layer_norm_epsilon
        self.attention_norm = RMSNorm.load(weights, f"{prefix}.0.layer_norm", eps)
        self.attention = SelfAttention(config, weights, f"{prefix}.0.SelfAttention", tp, layer)
        self.ff_norm = RMSNorm.load(weights, f"{prefix}.1.layer_norm", eps)
        self.ff = FeedForward(config, weights, f"{prefix}.1.DenseReluDense", tp)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        hidden = _keep_finite(hidden + self.attention(self.attention_norm(hidden), bias, None))
        return _keep_finite(hidden + self.ff(self.ff_norm(hidden)))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, weights: Weights, tp: TensorParallel, layer: int):
        super().__init__()
        prefix = f"decoder.block.{layer}.layer"
        eps = config.layer_norm_epsilon
        self.attention_norm = RMSNorm.load(weights, f"{prefix}.0.layer_norm", eps)
        self.attention = SelfAttention(config, weights, f"{prefix}.0.SelfAttention", tp, layer)
        self.cross_norm = RMSNorm.load(weights, f"{prefix}.1.layer_norm", eps)
        self.cross = CrossAttention(config, weights, f"{prefix}.1.EncDecAttention", tp, layer)
        self.ff_norm = RMSNorm.load(weights, f"{prefix}.2.layer_norm", eps)
        self.ff = FeedForward(config, weights, f"{prefix}.2.DenseReluDense", tp)

    def forward(
        self,
        hidden: torch.Tensor,
        self_bias: torch.Tensor,
        encoder_hidden: torch.Tensor,
        cross_bias: torch.Tensor,
        cache: EncoderDecoderCache | None,
    ) -> torch.Tensor:
        self_cache = cache.self_attention_cache if cache is not None else None
        hidden = _keep_finite(hidden + self.attention(self.attention_norm(hidden), self_bias, self_cache))
        hidden = _keep_finite(hidden + self.cross(self.cross_norm(hidden), encoder_hidden, cross_bias, cache))
        return _keep_finite(hidden + self.ff(self.ff_norm(hidden)))


class T5Encoder(nn.Module):
    def __init__(self, config: PretrainedConfig, weights: Weights, tp: TensorParallel, embed: VocabParallelEmbedding):
        super().__init__()
        self.config = config
        self.embed_tokens = embed
        bias_name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        self.position_bias = RelativePositionBias(config, weights, bias_name, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(config, weights, tp, i) for i in range(config.num_layers))
        self.final_norm = RMSNorm.load(weights, "encoder.final_layer_norm", config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> BaseModelOutput:
        """[batch, positions] ids, or their embeddings (prompt prefixes), right-padded where
        ``attention_mask`` is 0 → hidden states."""
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = hidden.shape[1]
        bias = self.position_bias(length, length, 0)
        if attention_mask is not None:
            bias = bias + _padding_bias(attention_mask, hidden.dtype)[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return BaseModelOutput(last_hidden_state=self.final_norm(hidden))


class T5Decoder(nn.Module):
    def __init__(self, config: PretrainedConfig, weights: Weights, tp: TensorParallel, embed: VocabParallelEmbedding):
        super().__init__()
        # Its own config, as transformers' decoder stack has: caches are sized from it.
        self.config = copy.deepcopy(config)
        self.config.is_decoder = True
        self.config.num_layers = config.num_decoder_layers
        self.embed_tokens = embed
        bias_name = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        self.position_bias = RelativePositionBias(config, weights, bias_name, bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(config, weights, tp, i) for i in range(config.num_decoder_layers))
        self.final_norm = RMSNorm.load(weights, "decoder.final_layer_norm", config.layer_norm_epsilon)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        encoder_hidden: torch.Tensor,
        encoder_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New decoder tokens after the cached ones (or their embeddings: a decoder prompt prefix)
        → their hidden states.

        ``attention_mask`` covers the cached and the new positions; left padding shifts a row's
        columns, not the distances between them, so one position bias serves every row.
        """
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        new = hidden.shape[1]
        past = cache.self_attention_cache.get_seq_length(0) if cache is not None else 0
        total = past + new
        self_bias = self.position_bias(new, total, past)
        causal = torch.ones((new, total), dtype=torch.bool, device=hidden.device).tril(past)
        visible = causal[None] if attention_mask is None else causal[None] & attention_mask[:, None, :].bool()
        self_bias = self_bias + _padding_bias(visible, hidden.dtype)[:, None]
        if encoder_mask is None:
            encoder_mask = torch.ones(encoder_hidden.shape[:2], dtype=torch.long, device=hidden.device)
        cross_bias = _padding_bias(encoder_mask, hidden.dtype)[:, None, None, :]
        for layer in self.layers:
            hidden = layer(hidden, self_bias, encoder_hidden, cross_bias, cache)
        return self.final_norm(hidden)


def _scales_decoder_output(config: PretrainedConfig) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 before the LM head.

    T5 1.0 does so because its head is the input embedding; 1.1, mT5 and mT0 have their own head
    and do not. transformers 5 always reports tied embeddings and keeps the checkpoint's intent in
    ``scale_decoder_outputs`` (T5), or never scales (mT5).
    """
    if config.model_type == "mt5":
        return False
    return bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))


class T5ForConditionalGeneration(nn.Module):
    """The interface ``Seq2SeqLMEngine`` drives: encoder once per request, then one decoder step."""

    def __init__(self, config: PretrainedConfig, weights: Weights, tp: TensorParallel):
        super().__init__()
        if config.num_heads % tp.world_size:
            raise UnsupportedModelError(f"{config.num_heads} attention heads do not split over {tp.world_size} ranks")
        self.config = config
        self.generation_config = GenerationConfig.from_model_config(config)
        embedding = next((name for name in EMBEDDING_NAMES if weights.has(name)), EMBEDDING_NAMES[0])
        self.shared = VocabParallelEmbedding.load(weights, embedding, tp)
        self.encoder = T5Encoder(config, weights, tp, self.shared)
        self.decoder = T5Decoder(config, weights, tp, self.shared)
        # A stored head is used whatever the config says (1.1 checkpoints keep it separate);
        # otherwise the embedding doubles as the head.
        if weights.has("lm_head.weight"):
            self.lm_head = ParallelLMHead.load(weights, "lm_head.weight", tp, config.vocab_size)
        else:
            self.lm_head = ParallelLMHead.tied(self.shared, config.vocab_size)
        self.output_scale = config.d_model**-0.5 if _scales_decoder_output(config) else None

    def get_encoder(self) -> T5Encoder:
        return self.encoder

    def get_input_embeddings(self) -> VocabParallelEmbedding:
        return self.shared

    def get_decoder(self) -> T5Decoder:
        return self.decoder

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple[torch.Tensor, ...] | None = None,
        cache: EncoderDecoderCache | None = None,
        use_cache: bool | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
    ) -> Seq2SeqLMOutput:
        """Decoder logits for ``decoder_input_ids`` (or their embeddings), running the encoder unless
        its output is given; ``cache`` (unless ``use_cache`` is False) holds earlier decoder
        positions and grows by the new ones."""
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError("T5 needs decoder_input_ids or decoder_inputs_embeds")
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("T5 needs input_ids or encoder_outputs")
            encoder_outputs = self.encoder(input_ids, attention_mask)
        if use_cache is False:
            cache = None
        hidden = self.decoder(
            decoder_input_ids, decoder_attention_mask, encoder_outputs[0], attention_mask, cache, decoder_inputs_embeds
        )
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        # The cache grows in place; the output's name for it differs between transformers releases.
        return Seq2SeqLMOutput(logits=self.lm_head(hidden))


def build(config: PretrainedConfig, weights: Weights, tp: TensorParallel) -> T5ForConditionalGeneration:
    """The family entry point registered with tgis (model types t5 and mt5)."""
    return T5ForConditionalGeneration(config, weights, tp).eval()
