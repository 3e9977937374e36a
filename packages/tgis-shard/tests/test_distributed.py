"""The tensor-parallel collectives between two real gloo ranks, and the process-free single rank."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.support.ports import free_port
from tgis_shard.layers.distributed import SINGLE, TensorParallel, init_tensor_parallel, shutdown

WORLD_SIZE = 2
# A lost peer must fail the collective well before the test's own deadline.
COLLECTIVE_TIMEOUT_S = 10
TEST_DEADLINE_S = 60


def _collectives(rank: int, world_size: int, port: int) -> None:
    """One rank's half of the test; an assertion here fails the parent through the spawn context."""
    torch.set_num_threads(1)
    tp = init_tensor_parallel(rank, world_size, torch.device("cpu"), "127.0.0.1", port, COLLECTIVE_TIMEOUT_S)
    try:
        assert (tp.rank, tp.world_size) == (rank, world_size)
        assert tp.group is not None

        x = torch.full((2, 3), float(rank + 1))
        assert tp.all_reduce(x) is x
        assert torch.equal(x, torch.full((2, 3), float(sum(range(1, world_size + 1)))))

        mine = torch.arange(4, dtype=torch.float32).reshape(2, 2) + 10 * rank
        everyone = [torch.arange(4, dtype=torch.float32).reshape(2, 2) + 10 * r for r in range(world_size)]
        assert torch.equal(tp.all_gather(mine), torch.cat(everyone, dim=-1))
        assert torch.equal(tp.all_gather(mine, dim=0), torch.cat(everyone, dim=0))
        # A transposed view is not contiguous; the gather must still see its logical layout.
        assert torch.equal(tp.all_gather(mine.t(), dim=1), torch.cat([t.t() for t in everyone], dim=1))
        assert tp.min_over_ranks(10 + 5 * (world_size - rank)) == 15
    finally:
        shutdown()
    assert not dist.is_initialized()


def test_two_gloo_ranks_sum_with_all_reduce_and_concatenate_in_rank_order_with_all_gather() -> None:
    context = mp.start_processes(
        _collectives, args=(WORLD_SIZE, free_port()), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TEST_DEADLINE_S
    try:
        # join raises as soon as one rank raises or exits non-zero, and returns True once all are done.
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks still running after {TEST_DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_a_single_rank_needs_no_process_group_and_its_collectives_are_identities() -> None:
    tp = init_tensor_parallel(0, 1, torch.device("cpu"), "127.0.0.1", 1)
    assert tp == SINGLE
    assert not dist.is_initialized()
    x = torch.arange(6.0).reshape(2, 3)
    assert tp.all_reduce(x) is x
    assert tp.all_gather(x, dim=0) is x
    assert tp.min_over_ranks(7) == 7
    shutdown()  # nothing to tear down; must not raise


@pytest.mark.parametrize(("rank", "world_size"), [(2, 2), (-1, 2), (0, 0)])
def test_a_rank_outside_its_group_is_refused(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="outside a tensor-parallel group"):
        TensorParallel(rank, world_size, None)
