"""Choosing the next token of every request of a batch from the model's last logits.

The processor chain runs in TGIS's order: EOS mask (min_new_tokens) and length penalty →
repetition penalty → temperature → top_k → top_p → typical_p. Every step is vectorised over
the batch with per-row parameters; rows that don't use a processor pass through unchanged.
Token details (logprob, rank, top tokens) come from log_softmax of the final scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgis_proto import shard_pb2 as pb

NEG_INF = float("-inf")
# TGIS returns ties at the n-th top score, up to this many times n tokens.
TOP_N_TIE_FACTOR = 4


# --------------------------------------------------------------------------------------------
# Processors: each takes [batch, vocab] scores and per-row [batch] parameters.


def mask_eos(scores: torch.Tensor, eos_token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """EOS cannot be chosen in ``rows`` (those below their min_new_tokens)."""
    if eos_token_ids.numel() == 0:
        return scores
    eos_scores = scores[:, eos_token_ids]
    scores[:, eos_token_ids] = torch.where(rows.unsqueeze(1), NEG_INF, eos_scores)
    return scores


def length_penalty(
    scores: torch.Tensor,
    eos_token_ids: torch.Tensor,
    generated: torch.Tensor,
    start_index: torch.Tensor,
    decay_factor: torch.Tensor,
    enabled: torch.Tensor,
) -> torch.Tensor:
    """From ``start_index`` generated tokens on, boosts EOS exponentially (TGIS's formula):
    eos += |eos| * (decay_factor ** (generated - start_index) - 1)."""
    if eos_token_ids.numel() == 0:
        return scores
    steps = (generated - start_index).clamp(min=0).to(scores.dtype)
    active = enabled & (generated >= start_index)
    boost = torch.where(active, decay_factor.to(scores.dtype).pow(steps) - 1, 0.0).unsqueeze(1)
    eos_scores = scores[:, eos_token_ids]
    # A masked (-inf) EOS stays masked rather than becoming NaN.
    boosted = torch.where(torch.isfinite(eos_scores), eos_scores + eos_scores.abs() * boost, eos_scores)
    scores[:, eos_token_ids] = boosted
    return scores


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Tokens already ``seen`` (prompt and generated) get divided (positive scores) or multiplied
    (negative scores) by ``penalty`` (1.0 is off), like transformers' processor."""
    p = penalty.to(scores.dtype).unsqueeze(1)
    penalised = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(seen, penalised, scores)


def temperature(scores: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return scores / value.to(scores.dtype).unsqueeze(1)


def top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keeps the ``k`` best tokens of each row (ties at the k-th kept); 0 is off."""
    vocab = scores.shape[-1]
    k = k.clamp(max=vocab)
    largest = int(k.max())
    if largest == 0:
        return scores
    values = scores.topk(largest, dim=-1).values
    kth = values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
    threshold = torch.where(k.unsqueeze(1) > 0, kth, NEG_INF)
    return scores.masked_fill(scores < threshold, NEG_INF)


def top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keeps the smallest set of best tokens whose probability reaches ``p``; 1.0 is off."""
    sorted_scores, order = scores.sort(dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p.to(cumulative.dtype)).unsqueeze(1)
    remove[:, -1] = False  # the best token always stays
    remove &= (p < 1).unsqueeze(1)
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


def typical_p(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keeps the tokens whose surprise is closest to the entropy,
    up to probability ``mass``; 1.0 is off."""
    logprobs = scores.log_softmax(dim=-1)
    probs = logprobs.exp()
    entropy = -(logprobs * probs).nansum(dim=-1, keepdim=True)
    distance = (-logprobs - entropy).abs()
    sorted_distance, order = distance.sort(dim=-1)
    cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass.to(cumulative.dtype).unsqueeze(1)).sum(dim=1).clamp(max=scores.shape[-1] - 1)
    remove = sorted_distance > sorted_distance.gather(1, last.unsqueeze(1))
    remove[:, 0] = False
    remove &= (mass < 1).unsqueeze(1)
    return scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)


# --------------------------------------------------------------------------------------------
# Token details


@dataclass(frozen=True)
class TokenDetails:
    """Details of one chosen token per row, from log_softmax of the final scores."""

    logprobs: torch.Tensor  # [rows]
    ranks: torch.Tensor  # [rows]: 1 + number of tokens scored higher
    top_ids: torch.Tensor | None  # [rows, m], best first; may include ties beyond n
    top_logprobs: torch.Tensor | None


def token_details(logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: int) -> TokenDetails:
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_ids = top_logprobs = None
    if top_n:
        width = min(top_n * TOP_N_TIE_FACTOR, logprobs.shape[-1])
        top_logprobs, top_ids = logprobs.topk(width, dim=-1)
    return TokenDetails(chosen.squeeze(1), ranks, top_ids, top_logprobs)


def top_tokens(ids: Sequence[int], logprobs: Sequence[float], n: int) -> tuple[tuple[int, float], ...]:
    """The ``n`` best of a row's candidates plus ties at the n-th score; removed tokens never."""
    if n <= 0 or not ids:
        return ()
    cutoff = logprobs[min(n, len(logprobs)) - 1]
    return tuple(
        (i, lp)
        for rank, (i, lp) in enumerate(zip(ids, logprobs, strict=True))
        if lp != NEG_INF and (rank < n or lp == cutoff) and rank < n * TOP_N_TIE_FACTOR
    )


# --------------------------------------------------------------------------------------------
# The batch's chooser


@dataclass(frozen=True)
class ChosenTokens:
    """The chosen token of each row, with details when any row asked for them."""

    token_ids: torch.Tensor  # [batch] int64
    details: TokenDetails | None


class BatchTokenChooser:
    """Per-row decoding parameters and state (generated count, seen tokens, random generator)."""

    def __init__(
        self,
        requests: Sequence[pb.Request],
        eos_token_ids: torch.Tensor,
        seen: torch.Tensor | None,
        generated: torch.Tensor,
        generators: list[torch.Generator | None],
    ):
        device = generated.device
        self.requests = list(requests)
        self.eos_token_ids = eos_token_ids
        self.seen = seen
        self.generated = generated
        self.generators = generators
        choosers = [r.chooser for r in self.requests]
        self.sample = torch.tensor([c.sample for c in choosers], device=device)
        self.min_new_tokens = torch.tensor([c.min_new_tokens for c in choosers], device=device)
        self.repetition = torch.tensor(
            [c.repetition_penalty if c.repetition_penalty > 0 else 1.0 for c in choosers], device=device
        )
        self.length_enabled = torch.tensor([c.length_penalty for c in choosers], device=device)
        self.length_start = torch.tensor([c.length_penalty_start for c in choosers], device=device)
        self.length_decay = torch.tensor([c.length_penalty_decay or 1.0 for c in choosers], device=device)
        # Greedy rows ignore the sampling warpers: their parameters are set to "off".
        self.temperature = torch.tensor(
            [c.temperature if c.sample and c.temperature > 0 else 1.0 for c in choosers], device=device
        )
        self.top_k = torch.tensor([c.top_k if c.sample else 0 for c in choosers], device=device)
        self.top_p = torch.tensor([c.top_p if c.sample and 0 < c.top_p < 1 else 1.0 for c in choosers], device=device)
        self.typical_p = torch.tensor(
            [c.typical_p if c.sample and 0 < c.typical_p < 1 else 1.0 for c in choosers], device=device
        )
        details = [r.details for r in self.requests]
        self.want_details = any(d.logprobs or d.ranks or d.top_n for d in details)
        self.top_n = max((d.top_n for d in details), default=0)

    @classmethod
    def from_requests(
        cls,
        requests: Sequence[pb.Request],
        eos_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device,
        prompt_in_history: bool,
    ) -> BatchTokenChooser:
        """``prompt_in_history``: the repetition penalty also covers the input tokens."""
        seen = None
        if any(r.chooser.repetition_penalty not in (0.0, 1.0) for r in requests):
            seen = torch.zeros((len(requests), vocab_size), dtype=torch.bool, device=device)
            if prompt_in_history:
                for row, request in enumerate(requests):
                    ids = torch.tensor([i for i in request.input_ids if i < vocab_size], dtype=torch.long)
                    seen[row, ids.to(device)] = True
        generators: list[torch.Generator | None] = []
        for request in requests:
            generator = None
            if request.chooser.sample:
                generator = torch.Generator(device=device)
                generator.manual_seed(request.chooser.seed)
            generators.append(generator)
        return cls(
            requests,
            torch.tensor(list(eos_token_ids), dtype=torch.long, device=device),
            seen,
            torch.zeros(len(requests), dtype=torch.long, device=device),
            generators,
        )

    def select(self, rows: Sequence[int]) -> BatchTokenChooser:
        index = torch.tensor(list(rows), dtype=torch.long, device=self.generated.device)
        return BatchTokenChooser(
            [self.requests[i] for i in rows],
            self.eos_token_ids,
            self.seen[index] if self.seen is not None else None,
            self.generated[index],
            [self.generators[i] for i in rows],
        )

    @staticmethod
    def concatenate(choosers: Sequence[BatchTokenChooser]) -> BatchTokenChooser:
        seen = None
        if any(c.seen is not None for c in choosers):
            vocab = next(c.seen.shape[1] for c in choosers if c.seen is not None)
            seen = torch.cat(
                [
                    c.seen
                    if c.seen is not None
                    else torch.zeros((len(c.requests), vocab), dtype=torch.bool, device=c.generated.device)
                    for c in choosers
                ]
            )
        return BatchTokenChooser(
            [r for c in choosers for r in c.requests],
            choosers[0].eos_token_ids,
            seen,
            torch.cat([c.generated for c in choosers]),
            [g for c in choosers for g in c.generators],
        )

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The final scores: the whole processor chain applied to [batch, vocab] logits."""
        scores = logits.float().clone()
        below_min = self.generated < self.min_new_tokens
        if bool(below_min.any()):
            scores = mask_eos(scores, self.eos_token_ids, below_min)
        if bool(self.length_enabled.any()):
            scores = length_penalty(
                scores, self.eos_token_ids, self.generated, self.length_start, self.length_decay, self.length_enabled
            )
        if self.seen is not None:
            scores = repetition_penalty(scores, self.seen, self.repetition)
        if not bool(self.sample.any()):
            return scores
        if bool((self.temperature != 1).any()):
            scores = temperature(scores, self.temperature)
        if bool((self.top_k > 0).any()):
            scores = top_k(scores, self.top_k)
        if bool((self.top_p < 1).any()):
            scores = top_p(scores, self.top_p)
        if bool((self.typical_p < 1).any()):
            scores = typical_p(scores, self.typical_p)
        return scores

    def _sample(self, scores: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
        # One uniform draw per sampled row from its own generator: a seed gives the same tokens
        # whatever else shares the batch. The draws are the only per-row work; the inverse-CDF
        # lookup over the vocabulary is one batched op.
        uniform = torch.ones(len(self.generators), device=scores.device)
        for row, generator in enumerate(self.generators):
            if generator is not None:
                uniform[row] = 1.0 - torch.rand(1, generator=generator, device=scores.device)
        cdf = scores.softmax(dim=-1).cumsum(dim=-1)
        sampled = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        return torch.where(self.sample, sampled.clamp(max=scores.shape[-1] - 1), greedy)

    def choose(self, logits: torch.Tensor) -> ChosenTokens:
        """Chooses one token per row from [batch, vocab] logits and advances the row state."""
        scores = self.process(logits)
        token_ids = scores.argmax(dim=-1)
        if bool(self.sample.any()):
            token_ids = self._sample(scores, token_ids)
        details = None
        if self.want_details:
            details = token_details(scores.log_softmax(dim=-1), token_ids, self.top_n)
        self.generated += 1
        if self.seen is not None:
            self.seen[torch.arange(len(token_ids), device=token_ids.device), token_ids] = True
        return ChosenTokens(token_ids, details)
