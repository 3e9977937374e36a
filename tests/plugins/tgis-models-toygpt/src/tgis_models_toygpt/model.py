"""GPT-2 built from tgis's public tensor-parallel layers.

GPT-2 stores its projections as Conv1D weights, [in, out]: slices are taken along the output
(column-parallel) or input (row-parallel) axis and transposed into linear layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Config
from transformers.activations import ACT2FN

from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgis_shard.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgis_shard.layers.norm import LayerNorm
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache, paged_attention
from tgis_shard.weights import Weights


def _column(weights: Weights, prefix: str, blocks: list[int]) -> ColumnParallelLinear:
    weight = weights.get_packed_sharded(f"{prefix}.weight", 1, blocks).t().contiguous()
    return ColumnParallelLinear(weight, weights.get_packed_sharded(f"{prefix}.bias", 0, blocks))


def _row(weights: Weights, prefix: str, tp: TensorParallel) -> RowParallelLinear:
    weight = weights.get_sharded(f"{prefix}.weight", 0).t().contiguous()
    return RowParallelLinear(weight, weights.get(f"{prefix}.bias"), tp)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, weights: Weights, tp: TensorParallel, root: str, layer: int):
        super().__init__()
        prefix = f"{root}h.{layer}"
        hidden = config.n_embd
        self.layer = layer
        self.heads = config.n_head // tp.world_size
        self.head_dim = hidden // config.n_head
        self.ln_1 = LayerNorm.load(weights, f"{prefix}.ln_1", config.layer_norm_epsilon)
        self.c_attn = _column(weights, f"{prefix}.attn.c_attn", [hidden, hidden, hidden])
        self.attn_proj = _row(weights, f"{prefix}.attn.c_proj", tp)
        self.ln_2 = LayerNorm.load(weights, f"{prefix}.ln_2", config.layer_norm_epsilon)
        self.c_fc = _column(weights, f"{prefix}.mlp.c_fc", [config.n_inner or 4 * hidden])
        self.mlp_proj = _row(weights, f"{prefix}.mlp.c_proj", tp)
        self.act = ACT2FN[config.activation_function]

    def forward(self, hidden: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        q, k, v = (t.view(tokens, self.heads, self.head_dim) for t in self.c_attn(self.ln_1(hidden)).chunk(3, dim=-1))
        cache.store(self.layer, k, v, meta.slots)
        attended = paged_attention(q, cache, self.layer, meta, self.head_dim**-0.5)
        hidden = hidden + self.attn_proj(attended.reshape(tokens, -1))
        return hidden + self.mlp_proj(self.act(self.c_fc(self.ln_2(hidden))))


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config, weights: Weights, tp: TensorParallel):
        super().__init__()
        # Hub checkpoints name tensors "h.0...", GPT2LMHeadModel.save_pretrained "transformer.h.0...".
        root = "transformer." if weights.has("transformer.wte.weight") else ""
        self.wte = VocabParallelEmbedding.load(weights, f"{root}wte.weight", tp)
        self.wpe = nn.Parameter(weights.get(f"{root}wpe.weight"), requires_grad=False)
        self.blocks = nn.ModuleList(Block(config, weights, tp, root, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm.load(weights, f"{root}ln_f", config.layer_norm_epsilon)
        self.lm_head = ParallelLMHead.tied(self.wte, config.vocab_size)
        self.num_layers = config.n_layer
        self.num_heads = self.num_kv_heads = self.blocks[0].heads
        self.head_dim = self.blocks[0].head_dim
        self.uses_alibi = False

    def forward(self, input_ids, positions, cache, meta):
        hidden = self.wte(input_ids) + self.wpe[positions]
        for block in self.blocks:
            hidden = block(hidden, cache, meta)
        return hidden

    def compute_logits(self, hidden):
        return self.lm_head(self.ln_f(hidden))


def build(config: GPT2Config, weights: Weights, tp: TensorParallel) -> GPT2:
    return GPT2(config, weights, tp).eval()
