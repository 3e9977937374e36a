"""Prompt prefixes as the router sees them: an id the shards resolve to a length in tokens."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import grpc

from tgis_router import metrics
from tgis_router.errors import ShardUnavailableError, ValidationError

# The shard's answers that mean "this prefix cannot be used", as opposed to a shard failure.
_CLIENT_ERRORS = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


class PrefixLengths:
    """Asks the shards for a prefix's length; every failure becomes a client-facing error."""

    def __init__(self, lookup: Callable[[str], Awaitable[int]]):
        self._lookup = lookup

    async def length(self, prefix_id: str) -> int:
        started = time.monotonic()
        try:
            length = await self._lookup(prefix_id)
        except grpc.aio.AioRpcError as e:
            metrics.prompt_load_failure.inc()
            reason = e.details() or e.code().name
            if e.code() in _CLIENT_ERRORS:
                raise ValidationError(f"can't retrieve prompt prefix with id '{prefix_id}': {reason}") from e
            raise ShardUnavailableError(f"prompt prefix lookup of '{prefix_id}' failed: {reason}") from e
        metrics.prompt_load_duration.observe(time.monotonic() - started)
        return length
