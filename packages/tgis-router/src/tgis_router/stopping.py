"""When a request stops, in TGIS's order (stop sequences are matched on the decoded text)."""

from __future__ import annotations

from collections.abc import Collection

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
