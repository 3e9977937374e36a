"""User-facing failures, one type per class, mapped to a gRPC status in one place."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    metric_label = "generate"  # tgi_request_failure's err label (TGIS's values)


class ValidationError(RouterError):
    """A request parameter is out of range; the message names it (TGIS wording)."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    metric_label = "validation"


class OverloadedError(RouterError):
    """Accepting the call would exceed MAX_CONCURRENT_REQUESTS."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    metric_label = "conc_limit"

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationFailedError(RouterError):
    """A shard, or the router itself, failed while running the request."""

    status = grpc.StatusCode.INTERNAL


class OutOfMemoryError(RouterError):
    """The request's step ran out of device memory, or the request can never fit."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShardUnavailableError(RouterError):
    """A shard is gone or its connection broke."""

    status = grpc.StatusCode.UNAVAILABLE


class ShuttingDownError(RouterError):
    """The server no longer takes generation calls: it is shutting down."""

    status = grpc.StatusCode.UNAVAILABLE
    metric_label = "unavailable"


# How a shard RPC's failure reads to the client: the backend gone, out of memory, or a failure.
_SHARD_STATUS: dict[grpc.StatusCode, type[RouterError]] = {
    grpc.StatusCode.UNAVAILABLE: ShardUnavailableError,
    grpc.StatusCode.CANCELLED: ShardUnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OutOfMemoryError,
}


def shard_error(error: grpc.aio.AioRpcError, what: str) -> RouterError:
    """The client-facing error for a failed shard call; ``what`` names the call."""
    kind = _SHARD_STATUS.get(error.code(), GenerationFailedError)
    return kind(f"{what} failed: {error.details() or error.code().name}")
