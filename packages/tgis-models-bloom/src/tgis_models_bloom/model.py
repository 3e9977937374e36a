"""BLOOM as tensor-parallel blocks: embedding → LayerNorm → N × (LayerNorm → ALiBi attention →
LayerNorm → GELU MLP) → LayerNorm → tied LM head. Positions enter only as ALiBi biases on the
attention scores; all tokens of a step run as one ragged batch over the paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BloomConfig

from tgis_shard.families import SupportsPromptPrefixes
from tgis_shard.layers.alibi import alibi_slopes
from tgis_shard.layers.attention_heads import AttentionHeads
from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.layers.embedding import EmbeddingOverrides, ParallelLMHead, VocabParallelEmbedding, embed
from tgis_shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgis_shard.layers.norm import LayerNorm
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache
from tgis_shard.weights import Weights


class BloomAttention(nn.Module):
    def __init__(
        self,
        config: BloomConfig,
        weights: Weights,
        prefix: str,
        tp: TensorParallel,
        layer: int,
        slopes: torch.Tensor,
    ):
        super().__init__()
        num_heads = config.n_head // tp.world_size
        self.heads = AttentionHeads(layer, num_heads, num_heads, config.hidden_size // config.n_head)
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        # The fused rows are laid out per head as [q, k, v] (a [heads, 3, head_dim] view), so a
        # rank's heads are one contiguous run of 3 * head_dim-row groups: a head split reads them.
        name, group = f"{prefix}.query_key_value", 3 * self.heads.head_dim
        self.query_key_value = ColumnParallelLinear(
            weights.get_heads(f"{name}.weight", 0, config.n_head, group),
            weights.get_heads(f"{name}.bias", 0, config.n_head, group),
        )
        self.dense = RowParallelLinear.load(weights, f"{prefix}.dense", True, tp)

    def forward(self, hidden: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.query_key_value(hidden).view(hidden.shape[0], self.heads.num_heads, 3, self.heads.head_dim)
        q, k, v = qkv.unbind(dim=2)
        return self.dense(self.heads.attend(q, k, v, cache, meta, alibi_slopes=self.alibi_slopes))


class BloomMLP(nn.Module):
    def __init__(self, weights: Weights, prefix: str, tp: TensorParallel):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear.load(weights, f"{prefix}.dense_h_to_4h", True)
        self.dense_4h_to_h = RowParallelLinear.load(weights, f"{prefix}.dense_4h_to_h", True, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BLOOM's bloom_gelu is GELU's tanh approximation.
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class BloomBlock(nn.Module):
    def __init__(
        self,
        config: BloomConfig,
        weights: Weights,
        prefix: str,
        tp: TensorParallel,
        layer: int,
        slopes: torch.Tensor,
    ):
        super().__init__()
        prefix = f"{prefix}h.{layer}"
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm.load(weights, f"{prefix}.input_layernorm", eps)
        self.self_attention = BloomAttention(config, weights, f"{prefix}.self_attention", tp, layer, slopes)
        self.post_attention_layernorm = LayerNorm.load(weights, f"{prefix}.post_attention_layernorm", eps)
        self.mlp = BloomMLP(weights, f"{prefix}.mlp", tp)
        # Some BLOOM variants carry the normalised hidden state, not the block's input, past each sublayer.
        self.residual_after_norm = config.apply_residual_connection_post_layernorm

    def forward(self, hidden: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        hidden = (normed if self.residual_after_norm else hidden) + self.self_attention(normed, cache, meta)
        normed = self.post_attention_layernorm(hidden)
        return (normed if self.residual_after_norm else hidden) + self.mlp(normed)


class BloomForCausalLM(nn.Module, SupportsPromptPrefixes):
    """What the tgis_native engine drives (``tgis_shard.families.NativeCausalLM``)."""

    def __init__(self, config: BloomConfig, weights: Weights, tp: TensorParallel):
        super().__init__()
        # Checkpoints saved from BloomForCausalLM name the body "transformer."; bigscience's own,
        # saved from BloomModel, have no prefix.
        prefix = "transformer." if weights.has("transformer.word_embeddings.weight") else ""
        eps = config.layer_norm_epsilon
        self.word_embeddings = VocabParallelEmbedding.load(weights, f"{prefix}word_embeddings.weight", tp)
        self.word_embeddings_layernorm = LayerNorm.load(weights, f"{prefix}word_embeddings_layernorm", eps)
        # One set of slopes for every layer; it also refuses head counts that do not split over the
        # ranks, which a head split would otherwise replicate (double-counting in the dense sum).
        slopes = alibi_slopes(config.n_head, tp, weights.device)
        self.h = nn.ModuleList(BloomBlock(config, weights, prefix, tp, i, slopes) for i in range(config.n_layer))
        self.ln_f = LayerNorm.load(weights, f"{prefix}ln_f", eps)
        self.lm_head = ParallelLMHead.for_config(config, weights, self.word_embeddings)
        heads = self.h[0].self_attention.heads
        self.num_layers = config.n_layer
        self.hidden_size = config.hidden_size  # the width of prompt-prefix embeddings
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = heads.head_dim
        self.uses_alibi = True

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        embedding_overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """[tokens] ids → the last layer's [tokens, hidden]; ALiBi takes positions from ``meta``."""
        hidden = self.word_embeddings_layernorm(embed(self.word_embeddings, input_ids, embedding_overrides))
        for layer in self.h:
            hidden = layer(hidden, cache, meta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def build(config: BloomConfig, weights: Weights, tp: TensorParallel) -> BloomForCausalLM:
    """The family entry point registered with tgis."""
    return BloomForCausalLM(config, weights, tp).eval()
