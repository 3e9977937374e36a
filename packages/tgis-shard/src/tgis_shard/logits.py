"""Choosing the next token of every request of a batch from the model's last logits.

Vectorised over the batch: no per-request Python loop over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgis_proto import shard_pb2 as pb


@dataclass(frozen=True)
class ChosenTokens:
    """The chosen token of each row, with details for the rows that asked for them."""

    token_ids: torch.Tensor  # [batch] int64
    logprobs: torch.Tensor | None  # [batch] float32, log_softmax of the final scores
    ranks: torch.Tensor | None  # [batch] int64, 1 + number of tokens scored higher
    top_ids: torch.Tensor | None  # [batch, n]
    top_logprobs: torch.Tensor | None  # [batch, n]


class BatchTokenChooser:
    """The decoding parameters of a batch's requests, applied row-wise to a logits tensor."""

    def __init__(self, choosers: Sequence[pb.NextTokenChooser], details: Sequence[pb.TokenDetailOptions]):
        self.choosers = list(choosers)
        self.details = list(details)
        self._want_details = any(d.logprobs or d.ranks or d.top_n for d in self.details)
        self._top_n = max((d.top_n for d in self.details), default=0)

    def select(self, indices: Sequence[int]) -> BatchTokenChooser:
        return BatchTokenChooser([self.choosers[i] for i in indices], [self.details[i] for i in indices])

    @staticmethod
    def concatenate(choosers: Sequence[BatchTokenChooser]) -> BatchTokenChooser:
        return BatchTokenChooser(
            [c for ch in choosers for c in ch.choosers], [d for ch in choosers for d in ch.details]
        )

    def choose(self, logits: torch.Tensor) -> ChosenTokens:
        """``logits``: [batch, vocab] scores of the next position."""
        scores = logits.float()
        token_ids = scores.argmax(dim=-1)
        if not self._want_details:
            return ChosenTokens(token_ids, None, None, None, None)
        logprobs_all = torch.log_softmax(scores, dim=-1)
        chosen = logprobs_all.gather(1, token_ids.unsqueeze(1))
        ranks = (logprobs_all > chosen).sum(dim=-1) + 1
        top_ids = top_logprobs = None
        if self._top_n:
            top_logprobs, top_ids = logprobs_all.topk(self._top_n, dim=-1)
        return ChosenTokens(token_ids, chosen.squeeze(1), ranks, top_ids, top_logprobs)
