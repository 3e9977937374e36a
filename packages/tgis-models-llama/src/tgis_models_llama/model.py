"""LLaMA as tensor-parallel blocks: embedding → N × (RMSNorm → attention → RMSNorm → SwiGLU MLP)
→ RMSNorm → LM head. Grouped-query attention, rope scaling and tied embeddings come from the
config; all tokens of a step run as one ragged batch over the paged KV cache."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig

from tgis_shard.families import SupportsPromptPrefixes
from tgis_shard.layers import gated_act
from tgis_shard.layers.attention_heads import AttentionHeads
from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.layers.embedding import EmbeddingOverrides, ParallelLMHead, VocabParallelEmbedding, embed
from tgis_shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgis_shard.layers.norm import RMSNorm
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache
from tgis_shard.layers.rotary import RotaryEmbedding
from tgis_shard.weights import Weights


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, weights: Weights, prefix: str, tp: TensorParallel, layer: int):
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.heads = AttentionHeads(
            layer,
            config.num_attention_heads // tp.world_size,
            max(1, config.num_key_value_heads // tp.world_size),
            head_dim,
        )
        self.qkv = ColumnParallelLinear.load_qkv(
            weights,
            (f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"),
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim,
            bias=getattr(config, "attention_bias", False),
        )
        self.o_proj = RowParallelLinear.load(weights, f"{prefix}.o_proj", getattr(config, "attention_bias", False), tp)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.heads.split(self.qkv(hidden))
        return self.o_proj(self.heads.attend(q, k, v, cache, meta, rotary=(cos, sin)))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig, weights: Weights, prefix: str, tp: TensorParallel):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up = ColumnParallelLinear.load_fused(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], bias)
        self.down = RowParallelLinear.load(weights, f"{prefix}.down_proj", bias, tp)
        self.activation = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(gated_act.act_and_mul(self.activation, self.gate_up(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, weights: Weights, tp: TensorParallel, layer: int):
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm.load(weights, f"{prefix}.input_layernorm", config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, weights, f"{prefix}.self_attn", tp, layer)
        self.post_attention_layernorm = RMSNorm.load(weights, f"{prefix}.post_attention_layernorm", config.rms_norm_eps)
        self.mlp = LlamaMLP(config, weights, f"{prefix}.mlp", tp)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden``: the previous layer's MLP output, not yet added to the ``residual`` stream
        (the first layer: the embeddings, no residual), so that each residual add runs in one
        kernel with the norm after it. Returns this layer's ``(MLP output, residual)``."""
        if residual is None:
            normed, residual = self.input_layernorm(hidden), hidden
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attended = self.self_attn(normed, cos, sin, cache, meta)
        normed, residual = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual


class LlamaForCausalLM(nn.Module, SupportsPromptPrefixes):
    """What the tgis_native engine drives (``tgis_shard.families.NativeCausalLM``)."""

    def __init__(self, config: LlamaConfig, weights: Weights, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding.load(weights, "model.embed_tokens.weight", tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, weights, tp, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm.load(weights, "model.norm", config.rms_norm_eps)
        self.lm_head = ParallelLMHead.for_config(config, weights, self.embed_tokens)
        heads = self.layers[0].self_attn.heads
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size  # the width of prompt-prefix embeddings
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = heads.head_dim
        self.uses_alibi = False
        self.rotary = RotaryEmbedding(config, self.head_dim, weights.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        embedding_overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """[tokens] ids at [tokens] positions → the last layer's [tokens, hidden]."""
        hidden = embed(self.embed_tokens, input_ids, embedding_overrides)
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, cache, meta)
        return hidden + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def build(config: LlamaConfig, weights: Weights, tp: TensorParallel) -> LlamaForCausalLM:
    """The family entry point registered with tgis."""
    return LlamaForCausalLM(config, weights, tp).eval()
