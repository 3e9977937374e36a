"""What a ``tgis_native`` model family provides: the plugin author's contract, and the capabilities
a family declares on its class (read here, nowhere else; never inferred from signatures).

A family's entry point ``build(config, weights, tp)`` returns a module that meets
:class:`NativeCausalLM` for this rank's shard of the model. The engine runs one ragged step at a
time: it lays out the step's tokens, builds the attention metadata before the forward pass, and
chooses which rows' logits it needs.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

import torch

from tgis_shard.layers.paged_attention import AttentionMetadata, PagedKVCache


class NativeCausalLM(Protocol):
    """A decoder-only family's model on one rank."""

    num_layers: int
    num_heads: int  # query heads, on this rank
    num_kv_heads: int  # on this rank
    head_dim: int
    uses_alibi: bool  # attention adds ALiBi biases: backends that cannot are not chosen

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Runs the step's ``[tokens]`` ids at ``[tokens]`` positions through every layer, writing
        their keys and values into ``cache`` where ``meta`` says; returns the last layer's hidden
        states ``[tokens, hidden]``, before the final norm. ``meta`` and ``cache`` are read only
        through ``layers.attention_heads.AttentionHeads.attend``: on a GPU the engine replays the
        rest of the pass from CUDA graphs captured with other metadata (``engines.prompt_graphs``)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm and the LM head of the rows the engine chose: ``[rows, vocab]``, the
        whole vocabulary on every rank."""
        ...


class SupportsPromptPrefixes:
    """Mixed into a family that serves prompt prefixes: its ``forward`` also takes
    ``embedding_overrides`` (``tgis_shard.layers.embedding.embed`` applies them right after the
    word embedding), and ``hidden_size`` is the width of its embeddings. A family without it
    refuses the requests that name a prefix and serves the rest."""

    supports_prompt_prefixes: ClassVar[Literal[True]] = True
    hidden_size: int


def supports_prompt_prefixes(model: object) -> bool:
    return getattr(type(model), "supports_prompt_prefixes", False) is True
