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

    def Step(self, request, **_: object):
        name = "Step" if request.leaves else "Step2"
        return self._call(name, pb.StepResponse(failures=[pb.RequestFailure(request_id=r) for r in request.leaves]))

    def Reset(self, request, **_: object):
        return self._call("Reset", pb.ResetResponse())

    def Health(self, request, **_: object):
        return self._call("Forward" if request.forward else "Ping", pb.HealthResponse())


def test_batch_operations_run_one_at_a_time_in_order_on_every_rank_and_pings_do_not_wait():
    log: list[tuple[int, str, str]] = []

    async def main() -> None:
        client = ShardClient([])
        client._stubs = [RecordingStub(r, log, {"Step": 0.02, "Step2": 0.01}) for r in range(2)]
        step = client.step(pb.StepRequest(leaves=[1]))  # sent at once: nothing is in flight
        assert (0, "start", "Step") not in log  # ... but it starts when the loop runs
        second = client.step(pb.StepRequest())
        forward = asyncio.ensure_future(client.health(forward=True))
        reset = asyncio.ensure_future(client.reset())
        await asyncio.sleep(0.005)
        await client.health(forward=False)  # a ping answers while the step runs
        assert [f.request_id for f in (await step).failures] == [1]  # rank 0's answer
        assert list((await second).failures) == []
        await forward
        await reset

    asyncio.run(main())
    for rank in range(2):
        events = [(kind, name) for r, kind, name in log if r == rank and name != "Ping"]
        names = [name for kind, name in events if kind == "start"]
        assert names == ["Step", "Step2", "Forward", "Reset"]
        # Each one ends before the next starts.
        assert events == [(kind, name) for name in names for kind in ("start", "end")]
    # ... and on every rank: the next one starts after the slowest rank answered.
    assert log.index((0, "start", "Step2")) > log.index((1, "end", "Step"))
    ping_start = log.index((0, "start", "Ping"))
    assert ping_start < log.index((0, "end", "Step"))
