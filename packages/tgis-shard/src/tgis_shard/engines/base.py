"""What every engine provides to the shard server."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tgis_proto import shard_pb2 as pb
from tgis_proto.plugins import Registry


@dataclass(frozen=True)
class ShardContext:
    """Everything an engine needs to load its model on this rank."""

    model_dir: Path
    model_type: str
    dtype: torch.dtype
    device: torch.device
    rank: int
    world_size: int
    max_sequence_length: int
    registry: Registry


@dataclass(frozen=True)
class GeneratedToken:
    """One new token of one request, with the details it asked for."""

    request_id: int
    token_id: int
    logprob: float = float("nan")
    rank: int = 0
    top_tokens: tuple[tuple[int, float], ...] = ()
    input_tokens: tuple[pb.Token, ...] = ()


class BatchState(ABC):
    """The tensors of requests decoding together; owned by the shard, named by the router."""

    batch_id: int

    @property
    @abstractmethod
    def request_ids(self) -> list[int]: ...

    @abstractmethod
    def filter(self, keep_request_ids: Sequence[int]) -> BatchState | None:
        """Keeps the listed requests (in this batch's order); None when none remain."""


class Engine(ABC):
    """Runs prefill and decode steps for batches of one model."""

    @abstractmethod
    def info(self) -> pb.InfoResponse: ...

    @abstractmethod
    def prefill(self, batch: pb.Batch) -> tuple[list[GeneratedToken], BatchState]:
        """Runs the prompts of a new batch and returns each request's first token."""

    @abstractmethod
    def concatenate(self, states: Sequence[BatchState]) -> BatchState:
        """Merges batches into one; the first one's id is kept."""

    @abstractmethod
    def decode(self, state: BatchState) -> list[GeneratedToken]:
        """Decodes one more token for every request of the batch, in place."""

    @abstractmethod
    def health_check(self) -> None:
        """Runs a real one-token forward pass; raises when the model cannot compute."""
