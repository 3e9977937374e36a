"""Whether the server can generate, as TGIS's /health decides it.

While generation works (the last step succeeded) a probe only pings the shards, which answer
without waiting for the running step. After a failed step, or before the first one, a probe runs
a real one-token forward pass on every shard, and its result decides until the next step.
"""

from __future__ import annotations

import logging

import grpc

from tgis_router.shard_client import ShardClient

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0  # a safety net: kubelet probes time out sooner


class GenerationHealth:
    def __init__(self, shards: ShardClient):
        self._shards = shards
        self._generating = False  # unknown until the first step or forward pass

    def step_succeeded(self) -> None:
        self._generating = True

    def step_failed(self) -> None:
        self._generating = False

    async def check(self) -> str | None:
        """None when healthy, else why not."""
        forward = not self._generating
        try:
            await self._shards.health(forward=forward, timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            self._generating = False
            reason = f"{'forward pass' if forward else 'shard ping'} failed: {e.details() or e.code().name}"
            log.error("health check: %s", reason)
            return reason
        if forward:
            self._generating = True
        return None
