"""A decode step's product ``x @ weight.T`` as one Triton kernel that reads the weight once, split
along K where the output alone would leave the device idle, and summed by the last program of each
output tile in a fixed order (no second kernel, the same bits every run).

Why: on an H200 a decode step's products are reads of their weights, and cuBLAS read the 8B
shape's QKV and output projections at 3.1 TB/s of the device's 4.2 at one row (plus 64 split-K
reduction kernels of 1.7 µs a step), and at 57-68 % of it at 128 rows (0.86 ms of a 128-row step
over the bytes' time, 2026-12-06 (5)). Here ``Tiles`` say how many output features a program
takes, how wide its K steps are and into how many parts K is cut; ``bench/split_k_matmul.py``
sweeps them against cuBLAS per shape and row count, and ``choose`` picks them for a shape. The
engine's linear layers call it only with SPLIT_K_MATMUL set (an experiment until the serving bench
measures it faster).

The split's partial sums go to a float32 workspace; each program then takes a ticket for its
output tile (an atomic counter in a buffer allocated once per device), and the one that arrives
last adds the parts in split order, writes the tile and resets the counter for the next launch.
The counters are shared by every launch on a device, so launches must not overlap on two streams
(the engine runs its steps on one).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: callers run F.linear
    triton = None

MAX_ROWS = 128  # the most the bench measured; past ~190 rows an H200 is bound by its tensor cores
ENABLED = os.environ.get("SPLIT_K_MATMUL", "").lower() in ("1", "true")
_TICKETS = 1 << 16  # output tiles one launch may have
_HALF = (torch.float16, torch.bfloat16)
_tickets: dict[torch.device, torch.Tensor] = {}


@dataclass(frozen=True)
class Tiles:
    """One launch's shape: output features per program, K-step width, parts K is cut into,
    pipeline depth and warps."""

    block_n: int = 64
    block_k: int = 128
    splits: int = 1
    stages: int = 4
    warps: int = 4

    def fits(self, features: int, depth: int) -> bool:
        """Whether these tiles divide the product: each part of K a whole number of K steps."""
        return depth % (self.splits * self.block_k) == 0 and features > 0


def serves(x: torch.Tensor, weight: torch.Tensor, tiles: Tiles) -> bool:
    """Whether the kernel computes ``x @ weight.T``: CUDA half-precision 2-D tensors with Triton,
    at most ``MAX_ROWS`` rows, both contiguous along K, and ``tiles`` fitting the shape."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in _HALF
        and weight.dtype == x.dtype
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and x.shape[1] == weight.shape[1]
        and tiles.fits(weight.shape[0], weight.shape[1])
    )


def choose(rows: int, features: int, depth: int, multiprocessors: int) -> Tiles | None:
    """Tiles for a product of ``rows`` × [``features``, ``depth``]: K steps as wide as shared
    memory allows for the rows, and K cut into the fewest parts that give every multiprocessor a
    program; None where nothing fits or the rows are past ``MAX_ROWS``."""
    if not 0 < rows <= MAX_ROWS:
        return None
    few_rows = rows <= 64
    block_n, block_k, stages, warps = (64, 256, 4, 4) if few_rows else (128, 64, 3, 8)
    tiles = -(-features // block_n)
    for splits in (1, 2, 4, 8, 16):
        option = Tiles(block_n, block_k, splits, stages, warps)
        if not option.fits(features, depth):
            return None
        if tiles * splits >= multiprocessors:
            return option
    return option


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tiles_for(x: torch.Tensor, weight: torch.Tensor) -> Tiles | None:
    """``choose``'s tiles where the kernel serves this product (SPLIT_K_MATMUL set, outside
    torch.compile), else None: the caller runs ``F.linear``."""
    if not ENABLED or triton is None or not x.is_cuda or x.dim() != 2 or torch.compiler.is_compiling():
        return None
    tiles = choose(x.shape[0], weight.shape[0], weight.shape[1], _multiprocessors(x.device))
    return tiles if tiles is not None and serves(x, weight, tiles) else None


def _tickets_for(device: torch.device) -> torch.Tensor:
    """The device's output-tile counters: zero between launches (each launch's last programs
    reset theirs), allocated once so that captured graphs keep pointing at them."""
    if device not in _tickets:
        _tickets[device] = torch.zeros(_TICKETS, dtype=torch.int32, device=device)
    return _tickets[device]


if triton is not None:

    @triton.jit
    def _split_k_kernel(
        x,
        weight,
        out,
        partials,
        tickets,
        rows,
        features,
        depth,
        x_row_stride,
        weight_row_stride,
        out_row_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLITS: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        tile = tl.program_id(0)
        part = tl.program_id(1)
        row = tl.arange(0, BLOCK_M)
        feature = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        span = depth // SPLITS
        first = part * span
        row_inside = row[:, None] < rows
        feature_inside = feature[:, None] < features
        x_tile = x + row[:, None].to(tl.int64) * x_row_stride + (first + k)[None, :]
        weight_tile = weight + feature[:, None].to(tl.int64) * weight_row_stride + (first + k)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in tl.range(0, span // BLOCK_K, num_stages=STAGES):
            xs = tl.load(x_tile, mask=row_inside, other=0.0)
            w = tl.load(weight_tile, mask=feature_inside, other=0.0)
            acc = tl.dot(xs, tl.trans(w), acc)
            x_tile += BLOCK_K
            weight_tile += BLOCK_K
        inside = row_inside & (feature[None, :] < features)
        target = out + row[:, None] * out_row_stride + feature[None, :]
        if SPLITS == 1:
            tl.store(target, acc.to(out.dtype.element_ty), mask=inside)
        else:
            # [SPLITS, rows, features] float32; L2 only (.cg): another multiprocessor reads them.
            cell = row[:, None] * features + feature[None, :]
            tl.store(partials + part * rows * features + cell, acc, mask=inside, cache_modifier=".cg")
            tl.debug_barrier()  # every thread's part is stored before the ticket releases it
            arrived = tl.atomic_add(tickets + tile, 1, sem="acq_rel")
            if arrived == SPLITS - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in tl.static_range(SPLITS):  # split order, whoever arrives last
                    total += tl.load(
                        partials + s * rows * features + cell, mask=inside, other=0.0, cache_modifier=".cg"
                    )
                tl.store(target, total.to(out.dtype.element_ty), mask=inside)
                tl.atomic_xchg(tickets + tile, 0)


def matmul(x: torch.Tensor, weight: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` [rows, K] and ``weight`` [N, K] (where ``serves``)."""
    rows, depth = x.shape
    features = weight.shape[0]
    out = torch.empty(rows, features, dtype=x.dtype, device=x.device)
    block_m = max(16, triton.next_power_of_2(rows))
    grid = (triton.cdiv(features, tiles.block_n), tiles.splits)
    if grid[0] > _TICKETS:
        raise ValueError(f"{grid[0]} output tiles; the counters hold {_TICKETS}")
    partials = (
        torch.empty(tiles.splits, rows, features, dtype=torch.float32, device=x.device) if tiles.splits > 1 else out
    )
    _split_k_kernel[grid](
        x,
        weight,
        out,
        partials,
        _tickets_for(x.device),
        rows,
        features,
        depth,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        SPLITS=tiles.splits,
        STAGES=tiles.stages,
        num_warps=tiles.warps,
    )
    return out
