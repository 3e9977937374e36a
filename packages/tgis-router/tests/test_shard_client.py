"""ShardClient: steps go out at once, numbered for the ranks to run in order; a reset or a
forward check waits for everything before it and holds back what comes after; pings and
lookups wait for nothing."""

from __future__ import annotations

import asyncio
import time

import grpc

from tgis_proto import shard_pb2 as pb
from tgis_proto import shard_pb2_grpc as pb_grpc
from tgis_router.shard_client import ShardClient


class RecordingStub:
    """A rank that logs when each call starts and ends; calls take their ``delays``."""

    def __init__(self, rank: int, log: list[tuple[int, str, str]], delays: dict[str, float]):
        self._rank, self._log, self._delays = rank, log, delays

    async def _call(self, name: str, response: object) -> object:
        self._log.append((self._rank, "start", name))
        await asyncio.sleep(self._delays.get(name, 0.0) * (1 + self._rank))  # rank 1 is slower
        self._log.append((self._rank, "end", name))
        return response

    def Step(self, request, **_: object):
        name = f"Step{request.sequence}"
        return self._call(name, pb.StepResponse(failures=[pb.RequestFailure(request_id=r) for r in request.leaves]))

    def Reset(self, request, **_: object):
        return self._call("Reset", pb.ResetResponse())

    def Health(self, request, **_: object):
        return self._call("Forward" if request.forward else "Ping", pb.HealthResponse())


def test_steps_go_out_at_once_numbered_and_barriers_wait_for_everything_before_them():
    log: list[tuple[int, str, str]] = []

    async def main() -> None:
        client = ShardClient([])
        delays = {"Step0": 0.02, "Step1": 0.01, "Forward": 0.005, "Reset": 0.005}
        client._stubs = [RecordingStub(r, log, delays) for r in range(2)]
        first = client.step(pb.StepRequest(leaves=[1]))
        second = client.step(pb.StepRequest())
        forward = client.health(forward=True)
        reset = client.reset()
        third = client.step(pb.StepRequest())
        await asyncio.sleep(0.005)
        await client.health(forward=False)  # a ping answers while the steps run
        assert [f.request_id for f in (await first).failures] == [1]  # rank 0's answer
        await asyncio.gather(second, forward, reset, third)

    asyncio.run(main())
    for rank in range(2):
        started = [name for r, kind, name in log if r == rank and kind == "start" and name != "Ping"]
        assert started == ["Step0", "Step1", "Forward", "Reset", "Step2"]
    # The second step went out before the first was answered: the shards order them by number.
    assert log.index((0, "start", "Step1")) < log.index((0, "end", "Step0"))
    # A barrier starts once every rank answered what came before it, and holds back what follows.
    assert log.index((0, "start", "Forward")) > log.index((1, "end", "Step0"))
    assert log.index((0, "start", "Reset")) > log.index((1, "end", "Forward"))
    assert log.index((0, "start", "Step2")) > log.index((1, "end", "Reset"))
    assert log.index((0, "start", "Ping")) < log.index((0, "end", "Step0"))


class _InfoOnly(pb_grpc.ShardServiceServicer):
    async def Info(self, request, context):
        return pb.InfoResponse()


def test_a_shard_that_starts_serving_late_is_seen_within_a_second_or_so(tmp_path):
    # gRPC's own reconnect backoff after ~10 s of refused connects is ~6 s: the launcher would
    # see the shard several seconds after its socket appeared.
    socket = tmp_path / "shard-0"
    serving_after_s = 10.0

    async def main() -> float:
        client = ShardClient([str(socket)])
        info = asyncio.ensure_future(client.info())
        await asyncio.sleep(serving_after_s)
        server = grpc.aio.server()
        pb_grpc.add_ShardServiceServicer_to_server(_InfoOnly(), server)
        server.add_insecure_port(f"unix://{socket}")
        await server.start()
        started = time.monotonic()
        await asyncio.wait_for(info, 30)
        seen_after = time.monotonic() - started
        await client.close()
        await server.stop(grace=None)
        return seen_after

    assert asyncio.run(main()) < 2.5
