"""Falcon as tensor-parallel blocks: embedding → N × decoder block → LayerNorm → LM head.

A block is one of three shapes, chosen by the config:

- parallel (Falcon-7B, and every new-decoder model): attention and MLP read the same normalised
  input and their outputs are added to the residual together; the new decoder (Falcon-40B/180B)
  gives each its own LayerNorm (``ln_attn``, ``ln_mlp``) unless ``num_ln_in_parallel_attn`` is 1;
- sequential (Falcon-RW): attention, then ``post_attention_layernorm`` and the MLP, as in GPT-2.

Query, key and value come from one fused projection stored per KV group (one group: multi-query;
a group per head: Falcon-RW; ``num_kv_heads`` groups: the new decoder). Positions are rotary, or
ALiBi biases where ``alibi`` is set. All tokens of a step run as one ragged batch over the paged
KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from tgis_shard.families import SupportsPromptPrefixes
from tgis_shard.layers.alibi import alibi_slopes
from tgis_shard.layers.attention_heads import AttentionHeads, Rotary
from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.layers.embedding import EmbeddingOverrides, ParallelLMHead, VocabParallelEmbedding, embed
from tgis_shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgis_shard.layers.norm import LayerNorm
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache
from tgis_shard.layers.rotary import RotaryEmbedding
from tgis_shard.weights import Weights


def _setting(config: PretrainedConfig, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config sets: pre-transformers RefinedWeb spellings come first."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class FalconLayout:
    """What Falcon's overlapping config flags mean for the blocks, resolved once.

    ``new_decoder_architecture`` overrides ``multi_query`` and ``parallel_attn``, and
    ``config.num_kv_heads`` counts only for the new decoder (transformers sets it to the number of
    query heads even for multi-query models). Pre-transformers RefinedWeb configs say ``n_head``,
    ``n_head_kv``, ``n_layer`` and imply the new decoder by the model_type ``RefinedWeb``.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    layer_norm_eps: float
    parallel: bool
    two_norms: bool
    alibi: bool
    bias: bool
    activation: str
    tied: bool

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> FalconLayout:
        num_heads = int(_setting(config, "n_head", "num_attention_heads"))
        hidden_size = int(_setting(config, "n_embed", "hidden_size"))
        if hidden_size % num_heads:
            raise ValueError(f"hidden size {hidden_size} does not divide into {num_heads} heads")
        new_decoder = getattr(config, "new_decoder_architecture", None)
        if new_decoder is None:
            new_decoder = config.model_type == "RefinedWeb"
        if new_decoder:
            num_kv_heads = int(_setting(config, "n_head_kv", "num_kv_heads", default=num_heads))
        else:
            num_kv_heads = 1 if _setting(config, "multi_query", default=True) else num_heads
        # transformers ignores parallel_attn=False in the new decoder (it fails on it, in fact).
        parallel = bool(new_decoder or _setting(config, "parallel_attn", default=True))
        return cls(
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            num_layers=int(_setting(config, "n_layer", "num_hidden_layers")),
            layer_norm_eps=float(_setting(config, "layer_norm_epsilon", default=1e-5)),
            parallel=parallel,
            two_norms=bool(new_decoder) and _setting(config, "num_ln_in_parallel_attn", default=2) == 2,
            alibi=bool(_setting(config, "alibi", default=False)),
            bias=bool(_setting(config, "bias", default=False)),
            activation=str(_setting(config, "activation", default="gelu")),
            tied=bool(_setting(config, "tie_word_embeddings", default=True)),
        )


class FalconAttention(nn.Module):
    def __init__(self, layout: FalconLayout, weights: Weights, prefix: str, tp: TensorParallel, layer: int):
        super().__init__()
        self.heads = AttentionHeads(
            layer, layout.num_heads // tp.world_size, max(1, layout.num_kv_heads // tp.world_size), layout.head_dim
        )
        fused = f"{prefix}.query_key_value"
        heads = (layout.num_heads, layout.num_kv_heads, layout.head_dim)
        self.query_key_value = ColumnParallelLinear(
            weights.get_head_groups(f"{fused}.weight", 0, *heads),
            weights.get_head_groups(f"{fused}.bias", 0, *heads) if layout.bias else None,
        )
        self.dense = RowParallelLinear.load(weights, f"{prefix}.dense", layout.bias, tp)
        self.alibi_slopes: torch.Tensor | None = None
        if layout.alibi:
            # transformers' Falcon rounds the slopes to bfloat16 and, unlike BLOOM, scales the bias
            # by 1/sqrt(head_dim) with the scores. (It also rounds slope × absolute key position to
            # bfloat16, which no distance-based kernel can repeat: past ~256 tokens it drifts.)
            slopes = alibi_slopes(layout.num_heads, tp, weights.device)
            self.alibi_slopes = slopes.bfloat16().float() * self.heads.scale

    def forward(
        self,
        hidden: torch.Tensor,
        rotary: Rotary | None,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        reduce: bool = True,
    ) -> torch.Tensor:
        """``reduce=False``: this rank's share, before the all-reduce and the bias."""
        q, k, v = self.heads.split(self.query_key_value(hidden))
        out = self.heads.attend(q, k, v, cache, meta, rotary=rotary, alibi_slopes=self.alibi_slopes)
        return self.dense(out) if reduce else self.dense.partial(out)


class FalconMLP(nn.Module):
    def __init__(self, layout: FalconLayout, weights: Weights, prefix: str, tp: TensorParallel):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear.load(weights, f"{prefix}.dense_h_to_4h", layout.bias)
        self.dense_4h_to_h = RowParallelLinear.load(weights, f"{prefix}.dense_4h_to_h", layout.bias, tp)
        self.act = ACT2FN[layout.activation]

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """``reduce=False``: this rank's share, before the all-reduce and the bias."""
        activated = self.act(self.dense_h_to_4h(x))
        return self.dense_4h_to_h(activated) if reduce else self.dense_4h_to_h.partial(activated)


class FalconDecoderLayer(nn.Module):
    def __init__(self, layout: FalconLayout, weights: Weights, tp: TensorParallel, layer: int):
        super().__init__()
        prefix = f"transformer.h.{layer}"
        eps = layout.layer_norm_eps
        self.parallel = layout.parallel
        # mlp_norm is None where the MLP reads the attention's normalised input.
        self.mlp_norm: LayerNorm | None = None
        if layout.two_norms:
            self.attn_norm = LayerNorm.load(weights, f"{prefix}.ln_attn", eps)
            self.mlp_norm = LayerNorm.load(weights, f"{prefix}.ln_mlp", eps)
        else:
            self.attn_norm = LayerNorm.load(weights, f"{prefix}.input_layernorm", eps)
            if not layout.parallel:
                self.mlp_norm = LayerNorm.load(weights, f"{prefix}.post_attention_layernorm", eps)
        self.self_attention = FalconAttention(layout, weights, f"{prefix}.self_attention", tp, layer)
        self.mlp = FalconMLP(layout, weights, f"{prefix}.mlp", tp)
        self.tp = tp

    def forward(
        self, hidden: torch.Tensor, rotary: Rotary | None, cache: PagedKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        normed = self.attn_norm(hidden)
        if not self.parallel:
            hidden = hidden + self.self_attention(normed, rotary, cache, meta)
            return hidden + self.mlp(self.mlp_norm(hidden))
        mlp_input = normed if self.mlp_norm is None else self.mlp_norm(hidden)
        # Attention and MLP read the same input: their shares are summed and reduced once.
        shares = self.self_attention(normed, rotary, cache, meta, reduce=False) + self.mlp(mlp_input, reduce=False)
        reduced = self.tp.all_reduce(shares)
        return hidden + self.mlp.dense_4h_to_h.add_bias(self.self_attention.dense.add_bias(reduced))


class FalconForCausalLM(nn.Module, SupportsPromptPrefixes):
    """What the tgis_native engine drives (``tgis_shard.families.NativeCausalLM``)."""

    def __init__(self, config: PretrainedConfig, weights: Weights, tp: TensorParallel):
        super().__init__()
        layout = FalconLayout.from_config(config)
        self.word_embeddings = VocabParallelEmbedding.load(weights, "transformer.word_embeddings.weight", tp)
        self.h = nn.ModuleList(FalconDecoderLayer(layout, weights, tp, i) for i in range(layout.num_layers))
        self.ln_f = LayerNorm.load(weights, "transformer.ln_f", layout.layer_norm_eps)
        self.lm_head = (
            ParallelLMHead.tied(self.word_embeddings, config.vocab_size)
            if layout.tied
            else ParallelLMHead.load(weights, "lm_head.weight", tp, config.vocab_size)
        )
        self.num_layers = layout.num_layers
        self.hidden_size = layout.num_heads * layout.head_dim  # the width of prompt-prefix embeddings
        self.num_heads = self.h[0].self_attention.heads.num_heads
        self.num_kv_heads = self.h[0].self_attention.heads.num_kv_heads
        self.head_dim = layout.head_dim
        self.uses_alibi = layout.alibi
        self.rotary = None if layout.alibi else RotaryEmbedding(config, layout.head_dim, weights.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        embedding_overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """[tokens] ids at [tokens] positions → the last layer's [tokens, hidden]."""
        hidden = embed(self.word_embeddings, input_ids, embedding_overrides)
        rotary = None if self.rotary is None else self.rotary.cos_sin(positions, hidden.dtype)
        for layer in self.h:
            hidden = layer(hidden, rotary, cache, meta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def build(config: PretrainedConfig, weights: Weights, tp: TensorParallel) -> FalconForCausalLM:
    """The family entry point registered with tgis."""
    return FalconForCausalLM(config, weights, tp).eval()
