"""When a request stops, in TGIS's order, and stop sequences matched on the decoded text."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tgis_router.requests import StopReason, ValidatedRequest


def token_stop_reason(
    request: ValidatedRequest, token_id: int, generated: int, eos_token_ids: Collection[int]
) -> StopReason | None:
    """The reason to stop after the ``generated``-th token, ignoring text and time."""
    # The shard masks EOS while fewer than min_new_tokens were generated before it.
    if token_id in eos_token_ids and generated > request.params.min_new_tokens:
        return StopReason.EOS_TOKEN
    if generated >= request.max_new_tokens:
        return StopReason.TOKEN_LIMIT if request.token_limited else StopReason.MAX_TOKENS
    return None


@dataclass(frozen=True)
class TextStep:
    """What one token's text delta means for the client."""

    emit: str  # text the client may see now
    stop_sequence: str | None = None  # set when a stop sequence ended the request


class StopSequenceFilter:
    """Holds back text that could be the start of a stop sequence until it is known not to be.

    Only text not yet emitted is searched, so each step costs O(longest stop sequence), not
    O(generated text).
    """

    def __init__(self, stop_sequences: Sequence[str], include_stop_sequence: bool):
        self._stops = tuple(stop_sequences)
        self._include = include_stop_sequence
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def add(self, delta: str, active: bool) -> TextStep:
        """``active`` is False before min_new_tokens: text then passes through unmatched."""
        text = self._held + delta
        self._held = ""
        if not self._stops or not active:
            return TextStep(text)
        match = self._first_match(text)
        if match is not None:
            stop, start = match
            return TextStep(text[: start + len(stop)] if self._include else text[:start], stop)
        hold = self._partial_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return TextStep(text[: len(text) - hold])

    def flush(self) -> str:
        """Releases held text when the request ends for another reason."""
        text, self._held = self._held, ""
        return text

    def _first_match(self, text: str) -> tuple[str, int] | None:
        """The stop sequence that completes first in ``text``, with its start."""
        best: tuple[str, int] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start != -1 and (best is None or start + len(stop) < best[1] + len(best[0])):
                best = (stop, start)
        return best

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop sequence."""
        longest = 0
        for stop in self._stops:
            for k in range(min(len(text), len(stop) - 1), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
