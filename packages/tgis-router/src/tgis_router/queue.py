"""Requests waiting for a batch, first come first served."""

from __future__ import annotations

import asyncio
from collections import deque

from tgis_router import metrics
from tgis_router.active import ActiveRequest


class RequestQueue:
    def __init__(self) -> None:
        self._entries: deque[ActiveRequest] = deque()
        self._not_empty = asyncio.Event()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: ActiveRequest) -> None:
        self._entries.append(entry)
        self._not_empty.set()
        metrics.queue_size.set(len(self._entries))

    async def wait(self) -> None:
        """Returns once at least one entry is waiting."""
        while not self._entries:
            self._not_empty.clear()
            await self._not_empty.wait()

    def take(self, n: int) -> list[ActiveRequest]:
        """Up to ``n`` live entries; entries whose client left meanwhile are finished here."""
        taken: list[ActiveRequest] = []
        while self._entries and len(taken) < n:
            entry = self._entries.popleft()
            if entry.finished:
                continue
            taken.append(entry)
        metrics.queue_size.set(len(self._entries))
        return taken
