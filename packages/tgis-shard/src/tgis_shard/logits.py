"""The logits processors and token details, vectorised over a batch with per-row parameters
(``tgis_shard.sampler`` chains them).

The chain runs in TGIS's order: EOS mask (min_new_tokens) and length penalty → repetition
penalty → temperature → top_k → top_p → typical_p; rows that don't use a processor pass
through unchanged. Token details (logprob, rank, top tokens) come from log_softmax of the final
scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")
# TGIS returns ties at the n-th top score, up to this many times n tokens.
TOP_N_TIE_FACTOR = 4
# ``row_argmax`` reduces each row in up to this many parts at once (a power of two).
ARGMAX_PARTS = 256


def row_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=-1)`` of ``[rows, vocab]`` scores (the first maximum of each row), in
    two passes over parts of each row. One reduction along a 128k-token row keeps few of a GPU's
    multiprocessors busy: on an H100 it took 28 µs for one row and 41 µs for 128 (0.8 TB/s);
    the rows' parts reduce side by side, then each row's part maxima. The parts are as many as
    divide the vocabulary, up to ``ARGMAX_PARTS``; a vocabulary no power of two divides takes one."""
    rows, vocab = scores.shape
    parts = math.gcd(vocab, ARGMAX_PARTS)  # the largest power of two dividing both
    if parts == 1 or scores.stride(-1) != 1:  # the parts are views of each row
        return scores.argmax(dim=-1)
    width = vocab // parts
    maxima, within = scores.view(rows, parts, width).max(dim=-1)  # first maximum of each part
    part = maxima.argmax(dim=-1, keepdim=True)  # the first part holding the row's maximum
    return within.gather(-1, part).squeeze(-1).add_(part.squeeze(-1), alpha=width)


# --------------------------------------------------------------------------------------------
# Processors: each takes [batch, vocab] scores and per-row [batch] parameters.


def mask_eos(scores: torch.Tensor, eos_token_ids: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """EOS cannot be chosen in ``rows`` (those below their min_new_tokens); None: in any row."""
    if eos_token_ids.numel() == 0:
        return scores
    if rows is None:
        return scores.index_fill_(1, eos_token_ids, NEG_INF)
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


def top_k(scores: torch.Tensor, k: torch.Tensor, largest: int) -> torch.Tensor:
    """Keeps the ``k`` best tokens of each row (ties at the k-th kept); 0 is off. ``largest``: the
    largest k of the rows, known on the host (reading it from ``k`` would wait for the device)."""
    vocab = scores.shape[-1]
    k = k.clamp(max=vocab)
    largest = min(largest, vocab)
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

    @staticmethod
    def joined(parts: Sequence[TokenDetails]) -> TokenDetails:
        """The details of consecutive chunks of a step's rows as one (the chunks share a top width)."""
        top_ids = [p.top_ids for p in parts if p.top_ids is not None]
        top_logprobs = [p.top_logprobs for p in parts if p.top_logprobs is not None]
        return TokenDetails(
            torch.cat([p.logprobs for p in parts]),
            torch.cat([p.ranks for p in parts]),
            torch.cat(top_ids) if top_ids else None,
            torch.cat(top_logprobs) if top_logprobs else None,
        )


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
