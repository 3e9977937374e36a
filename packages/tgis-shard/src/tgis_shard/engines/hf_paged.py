"""hf_transformers on the paged KV cache: a transformers decoder run by tgis_native's engine.

transformers' own forward pass keeps a padded batch in a dynamic cache and launches every
kernel from Python: on a GPU a step is host-bound (8B shape on an H100: ~86 ms a step at any
batch size, slower than generate()). A model whose attention goes through transformers'
``AttentionInterface`` takes an attention function of ours instead (``ATTENTION``): it writes the
step's keys and values into the paged cache where the router's block tables say and attends
with this device's kernels (FlashInfer, FlexAttention, torch) through the families'
``AttentionHeads``, each layer with the sliding window transformers hands it (a model whose
windows hide keys runs on a backend with windows: flash-attn, FlexAttention or torch).
transformers builds no mask for an attention function it does not know, so the pass is ragged
like a family's: one row of every token of the step, positions given. The rest is tgis_native's
engine: chunked prompts, steps launched ahead, CUDA graphs for decode and prompt steps (the pass
reads the step's metadata only in attention).

Models it cannot serve this way (``unsupported``) stay on the padded engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AttentionInterface, PretrainedConfig, PreTrainedModel

from tgis_shard.families import SupportsPromptPrefixes
from tgis_shard.layers.attention_heads import AttentionHeads
from tgis_shard.layers.embedding import EmbeddingOverrides, embed
from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache

# The attn_implementation a model is loaded with.
ATTENTION = "tgis_paged"
# The forward pass's keyword argument that transformers hands on to the attention function.
_STEP = "tgis_paged_step"
# RoPE variants whose frequencies change with the largest position in the pass: in a ragged
# step of many sequences one sequence's tokens would depend on the others' lengths.
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class _Step:
    cache: PagedKVCache
    meta: AttentionMetadata
    heads: dict[int, AttentionHeads]  # by layer, made on first use from the shapes it is given
    longest: int  # tokens in the longest sequence: a sliding window no shorter hides no key


# Outside torch.compile (PT2_COMPILE) as a whole, as AttentionHeads' own call: compiled, the
# per-layer heads made on first use would be guarded on, a graph per layer.
@torch.compiler.disable
def _paged_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``[1, heads, tokens, head_dim]`` in (rotated),
    ``[1, tokens, heads, head_dim]`` out. ``attention_mask`` is None: the metadata masks."""
    step = kwargs[_STEP]
    assert isinstance(step, _Step)
    layer = module.layer_idx
    heads = step.heads.get(layer)
    if heads is None:
        # transformers hands each layer its window (None for full attention): the last
        # ``window`` keys, the token's own included, as our backends count them.
        window = kwargs.get("sliding_window")
        window = window if isinstance(window, int) and window < step.longest else None
        heads = AttentionHeads(layer, query.shape[1], key.shape[1], query.shape[-1], scaling, window)
        step.heads[layer] = heads
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    out = heads.attend(q, k, v, step.cache, step.meta)
    return out.view(1, q.shape[0], heads.num_heads, heads.head_dim), None


AttentionInterface.register(ATTENTION, _paged_attention)


def unsupported(config: PretrainedConfig, max_sequence_length: int) -> str | None:
    """Why a causal LM of this config cannot run on the paged cache for sequences of up to
    ``max_sequence_length`` tokens; None when it can."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return f"transformers has no causal LM for model_type {config.model_type!r}"
    if not getattr(model_class, "_supports_attention_backend", False):
        return f"{model_class.__name__} does not take transformers' attention functions"
    if getattr(config, "alibi", False):
        return "its attention adds ALiBi biases"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        return f"its layers are not all full or sliding-window attention ({sorted(set(layer_types))})"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type") in BATCH_DEPENDENT_ROPE:
        return f"its rotary frequencies follow the longest position of the batch ({rope['rope_type']} RoPE)"
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            return f"it soft-caps its logits ({name})"
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"it scales its logits ({name})"
    return None


def hides_keys(config: PretrainedConfig, max_sequence_length: int) -> bool:
    """Whether some layer's sliding window is shorter than the longest sequence (Mistral 7B
    v0.1's 4,096 tokens is not, up to 4,096): then FlashInfer, whose plan has no window, stays out."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_sequence_length or not getattr(config, "use_sliding_window", True):
        return False
    layer_types = getattr(config, "layer_types", None)
    return not layer_types or "sliding_attention" in layer_types


class TransformersPagedLM(nn.Module, SupportsPromptPrefixes):
    """A transformers causal LM loaded with ``attn_implementation=ATTENTION``, as a family's
    model (``families.NativeCausalLM``) on one rank, for sequences of up to ``max_sequence_length``
    tokens."""

    uses_alibi = False

    def __init__(self, model: PreTrainedModel, max_sequence_length: int):
        super().__init__()
        config = model.config
        self.model = model
        self.max_sequence_length = max_sequence_length
        self.uses_sliding_window = hides_keys(config, max_sequence_length)
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        # The width of prompt-prefix embeddings: the embedding's (OPT-350m's is not hidden_size).
        self.hidden_size = model.get_input_embeddings().weight.shape[-1]
        self._heads: dict[int, AttentionHeads] = {}

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedKVCache,
        meta: AttentionMetadata,
        embedding_overrides: EmbeddingOverrides | None = None,
    ) -> torch.Tensor:
        """[tokens] ids at [tokens] positions → the decoder's [tokens, hidden] (after its final
        norm: transformers' decoders end with it, so ``compute_logits`` is the LM head alone)."""
        embedded = embed(self.decoder.get_input_embeddings(), input_ids, embedding_overrides)
        out = self.decoder(
            inputs_embeds=embedded[None],
            position_ids=positions[None],
            use_cache=False,
            **{_STEP: _Step(cache, meta, self._heads, self.max_sequence_length)},
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
