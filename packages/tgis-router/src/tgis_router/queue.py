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

    def put_front(self, entry: ActiveRequest) -> None:
        """A preempted request waits ahead of every other: it was admitted before them."""
        self._entries.appendleft(entry)
        self._not_empty.set()
        metrics.queue_size.set(len(self._entries))

    async def wait(self) -> None:
        """Returns once at least one entry is waiting."""
        while not self._entries:
            self._not_empty.clear()
            await self._not_empty.wait()

    def live(self) -> list[ActiveRequest]:
        """The waiting entries in arrival order; entries whose client left meanwhile are dropped."""
        if any(e.finished for e in self._entries):
            self._entries = deque(e for e in self._entries if not e.finished)
            metrics.queue_size.set(len(self._entries))
        return list(self._entries)

    def remove(self, entries: list[ActiveRequest]) -> None:
        """Takes admitted entries out of the queue."""
        taken = {id(e) for e in entries}
        self._entries = deque(e for e in self._entries if id(e) not in taken)
        metrics.queue_size.set(len(self._entries))
