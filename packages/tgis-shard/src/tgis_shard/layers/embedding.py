"""Vocabulary-parallel embedding and LM head: each rank holds a block of vocabulary rows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tgis_shard.layers.distributed import TensorParallel
from tgis_shard.weights import Weights


@dataclass(frozen=True)
class EmbeddingOverrides:
    """Token rows of a step whose word embeddings are given instead of looked up: the learned
    embeddings of prompt prefixes. A model family applies them right after its word embedding.

    ``rows`` are the indices of the overridden tokens and ``values`` their embeddings, one each;
    or, where the tensors must keep their size from step to step (a CUDA graph's fixed buffers),
    ``rows`` is a boolean mask over every token and ``values`` has a row for every token."""

    rows: torch.Tensor  # [k] indices into the step's tokens, or a [tokens] bool mask
    values: torch.Tensor  # [k, hidden], or [tokens, hidden] with a mask

    @classmethod
    def at(
        cls, prefixes: Sequence[torch.Tensor | None], starts: Sequence[int], device: torch.device
    ) -> EmbeddingOverrides | None:
        """Each prefix's embeddings from its start token on (``starts``: token indices, row-major
        for padded batches); None when no request has a prefix."""
        given = [(p, start) for p, start in zip(prefixes, starts, strict=True) if p is not None]
        if not given:
            return None
        rows = torch.cat([torch.arange(start, start + len(p), device=device) for p, start in given])
        return cls(rows, torch.cat([p for p, _ in given]))

    def apply(self, embedded: torch.Tensor) -> torch.Tensor:
        """``embedded``: [tokens, hidden], or a padded [rows, columns, hidden] batch."""
        flat = embedded.reshape(-1, embedded.shape[-1])
        if self.rows.dtype == torch.bool:
            return torch.where(self.rows[:, None], self.values.to(flat.dtype), flat).view_as(embedded)
        return flat.index_put((self.rows,), self.values.to(flat.dtype)).view_as(embedded)


def embed(
    embedding: VocabParallelEmbedding, input_ids: torch.Tensor, overrides: EmbeddingOverrides | None
) -> torch.Tensor:
    """Word embeddings of a step's tokens, with the given rows replaced."""
    embedded = embedding(input_ids)
    return embedded if overrides is None else overrides.apply(embedded)


class VocabParallelEmbedding(nn.Module):
    """Each rank embeds the ids in its vocabulary block (zeros elsewhere); an all-reduce sums."""

    def __init__(self, weight: torch.Tensor, tp: TensorParallel):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.tp = tp
        self.block = weight.shape[0]
        self.start = tp.rank * self.block

    @classmethod
    def load(cls, weights: Weights, name: str, tp: TensorParallel) -> VocabParallelEmbedding:
        return cls(weights.get_vocab_sharded(name, dim=0), tp)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.block)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        embedded = embedded.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(embedded)


class ParallelLMHead(nn.Module):
    """Each rank scores its vocabulary block; an all-gather assembles the full logits."""

    def __init__(self, weight: torch.Tensor, tp: TensorParallel, vocab_size: int):
        super().__init__()
        # A tied head shares the embedding's parameter: one copy in memory.
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.tp = tp
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, weights: Weights, name: str, tp: TensorParallel, vocab_size: int) -> ParallelLMHead:
        return cls(weights.get_vocab_sharded(name, dim=0), tp, vocab_size)

    @classmethod
    def tied(cls, embedding: VocabParallelEmbedding, vocab_size: int) -> ParallelLMHead:
        return cls(embedding.weight, embedding.tp, vocab_size)

    @classmethod
    def for_config(
        cls, config: object, weights: Weights, embedding: VocabParallelEmbedding, name: str = "lm_head.weight"
    ) -> ParallelLMHead:
        """Tied checkpoints (SmolLM2, BLOOM, most Falcons) store no head: the embedding doubles as it."""
        vocab_size = config.vocab_size  # type: ignore[attr-defined]
        if getattr(config, "tie_word_embeddings", True):
            return cls.tied(embedding, vocab_size)
        return cls.load(weights, name, embedding.tp, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp.world_size > 1:
            logits = self.tp.all_gather(logits.contiguous(), dim=-1)
        # The last block is zero-padded to equal size; padding rows are not tokens.
        return logits[..., : self.vocab_size]
