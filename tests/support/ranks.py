"""Running a function on N tensor-parallel ranks (spawned processes, gloo) and collecting results."""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

from tests.support.ports import free_port

RANK_TIMEOUT_S = 300.0


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # ranks share the test machine's 2 cores
    try:
        results.put((rank, "ok", fn(rank, world_size, port, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        # Leaving with the group up makes NCCL's watchdog report a crashed peer.
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Calls ``fn(rank, world_size, master_port, *args)`` in ``world_size`` processes; returns
    every rank's result in rank order, or raises with the first failing rank's traceback.
    One rank needs no process group and runs in this process."""
    if world_size == 1:
        return [fn(0, 1, 0, *args)]
    context = mp.get_context("spawn")
    results: mp.Queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    collected: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=RANK_TIMEOUT_S)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            collected[rank] = value
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    return [collected[rank] for rank in range(world_size)]
