"""The tensor-parallel group of one shard process: who this rank is and how it talks to the others.

Every tensor-parallel layer receives one ``TensorParallel`` instead of calling ``torch.distributed``
itself, so a single-process model runs the same code with ``SINGLE`` and no process group at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group; ``group`` is None when it is alone."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a tensor-parallel group of {self.world_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks in place (row-parallel outputs are partial sums) and returns it."""
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def min_over_ranks(self, value: int) -> int:
        """The smallest of the ranks' ``value``: sizes each rank measures on its own device (its KV
        cache, its prefill cap) must agree, since the router plans with one of them for all."""
        if self.world_size == 1:
            return value
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" else None
        smallest = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=self.group)
        return int(smallest.item())

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's ``x`` (all of one shape) along ``dim`` in rank order.

        Column-parallel outputs (and vocabulary-parallel logits) are slices of one tensor; this
        rebuilds it where a full copy is needed on each rank.
        """
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


SINGLE = TensorParallel(0, 1, None)


def init_tensor_parallel(
    rank: int,
    world_size: int,
    device: torch.device,
    master_addr: str,
    master_port: int,
    timeout_s: float = 600,
) -> TensorParallel:
    """Joins the process group of ``world_size`` shard ranks (NCCL on GPU, gloo on CPU).

    A single rank creates no process group, so serving one GPU needs neither a free port nor
    NCCL. The timeout bounds how long a rank waits for a peer that died or never started.
    """
    if world_size == 1:
        return TensorParallel(rank, 1, None)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {world_size}")
    if device.type == "cuda":
        # NCCL binds each communicator to the current device; it must be this rank's GPU before init.
        torch.cuda.set_device(device if device.index is not None else rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(
            f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) already exists; "
            f"cannot join as rank {rank} of {world_size}"
        )
    return TensorParallel(rank, world_size, dist.group.WORLD)


def shutdown() -> None:
    """Leaves the process group, if one was joined, so the rank exits without NCCL warnings."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree_with_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's values on every rank, in place; nothing to do outside a process group.

    Ranks compute the same logits, but the next step's inputs must be identical even where an
    all-reduce rounds differently, so the chosen tokens are rank 0's everywhere.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(x, src=0)
    return x
