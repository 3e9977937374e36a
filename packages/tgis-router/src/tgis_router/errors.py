"""User-facing failures, one type per class, mapped to a gRPC status in one place."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class ValidationError(RouterError):
    """A request parameter is out of range; the message names it (TGIS wording)."""

    status = grpc.StatusCode.INVALID_ARGUMENT


class OverloadedError(RouterError):
    """Accepting the call would exceed MAX_CONCURRENT_REQUESTS."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self) -> None:
        super().__init__("Model is overloaded")


class GenerationFailedError(RouterError):
    """A shard failed while running the request's batch."""

    status = grpc.StatusCode.INTERNAL


class ShardUnavailableError(RouterError):
    status = grpc.StatusCode.UNAVAILABLE
