"""The router's prefix lookup: shard answers become client-facing errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tgis_router.errors import ShardUnavailableError, ValidationError
from tgis_router.prefixes import PrefixLengths


def failing_lookup(code: grpc.StatusCode, details: str):
    async def lookup(prefix_id: str) -> int:
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)

    return lookup


def test_length_comes_from_the_shards():
    async def lookup(prefix_id: str) -> int:
        return {"tuned": 12}[prefix_id]

    assert asyncio.run(PrefixLengths(lookup).length("tuned")) == 12


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION]
)
def test_unusable_prefix_is_a_validation_error_naming_the_id_and_the_reason(code):
    with pytest.raises(ValidationError) as e:
        asyncio.run(PrefixLengths(failing_lookup(code, "it is not there")).length("tuned"))
    assert str(e.value) == "can't retrieve prompt prefix with id 'tuned': it is not there"
    assert e.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_a_failing_shard_is_unavailable_not_the_clients_fault():
    with pytest.raises(ShardUnavailableError, match="prompt prefix lookup of 'tuned' failed: socket closed"):
        asyncio.run(PrefixLengths(failing_lookup(grpc.StatusCode.UNAVAILABLE, "socket closed")).length("tuned"))
