"""ShardClient: batch operations reach every rank one at a time, in the order asked; pings and
lookups do not wait for them."""

from __future__ import annotations

import asyncio

from tgis_proto import shard_pb2 as pb
from tgis_router.shard_client import ShardClient


class RecordingStub:
    """A rank that logs when each call starts and ends; ``slow`` calls take a while."""

    def __init__(self, rank: int, log: list[tuple[int, str, str]], delays: dict[str, float]):
        self._rank, self._log, self._delays = rank, log, delays

    async def _call(self, name: str, response: object) -> object:
        self._log.append((self._rank, "start", name))
        await asyncio.sleep(self._delays.get(name, 0.0) * (1 + self._rank))  # rank 1 is slower
        self._log.append((self._rank, "end", name))
        return response

    def NextToken(self, request, **_: object):
        return self._call("NextToken", pb.StepResponse(batch_id=request.batch_id))

    def Prefill(self, request, **_: object):
        return self._call("Prefill", pb.StepResponse(batch_id=request.batch.id))

    def ClearCache(self, request, **_: object):
        return self._call("ClearCache", pb.ClearCacheResponse())

    def Health(self, request, **_: object):
        return self._call("Forward" if request.forward else "Ping", pb.HealthResponse())


def test_batch_operations_run_one_at_a_time_in_order_on_every_rank_and_pings_do_not_wait():
    log: list[tuple[int, str, str]] = []

    async def main() -> None:
        client = ShardClient([])
        client._stubs = [RecordingStub(r, log, {"NextToken": 0.02, "Prefill": 0.01}) for r in range(2)]
        step = client.next_token(1, [], [])  # sent at once: nothing is in flight
        assert (0, "start", "NextToken") not in log  # ... but it starts when the loop runs
        prefill = client.prefill(pb.Batch(id=2))
        forward = asyncio.ensure_future(client.health(forward=True))
        clear = asyncio.ensure_future(client.clear_cache(2))
        await asyncio.sleep(0.005)
        await client.health(forward=False)  # a ping answers while the step runs
        assert (await step).batch_id == 1
        assert (await prefill).batch_id == 2
        await forward
        await clear

    asyncio.run(main())
    for rank in range(2):
        events = [(kind, name) for r, kind, name in log if r == rank and name != "Ping"]
        names = [name for kind, name in events if kind == "start"]
        assert names == ["NextToken", "Prefill", "Forward", "ClearCache"]
        # Each one ends before the next starts.
        assert events == [(kind, name) for name in names for kind in ("start", "end")]
    # ... and on every rank: the next one starts after the slowest rank answered.
    assert log.index((0, "start", "Prefill")) > log.index((1, "end", "NextToken"))
    ping_start = log.index((0, "start", "Ping"))
    assert ping_start < log.index((0, "end", "NextToken"))
