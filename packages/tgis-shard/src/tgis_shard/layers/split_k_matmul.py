"""A decode step's product ``x @ weight.T`` as one Triton kernel that reads the weight once, split
along K where the output alone would leave the device idle, and summed by the last program of each
output tile in a fixed order (no second kernel, the same bits every run).

Why: on an H200 a decode step's products are reads of their weights, and cuBLAS read the 8B
shape's QKV and output projections at 3.1 TB/s of the device's 4.2 at one row (plus 64 split-K
reduction kernels of 1.7 µs a step), and at 57-68 % of it at 128 rows (0.86 ms of a 128-row step
over the bytes' time, 2026-12-06 (5)).

Which tiles, if any, beat cuBLAS depends on the device and the shape, so the engine measures
(``tune``, at warm-up): for each of the model's weight shapes and each class of row counts (the
kernel's row tile: 16, 32, 64, 128), cuBLAS against ``candidates``, on the device, the L2 cache
flushed before each run. A product then runs the fastest (``tiles_for``; None: cuBLAS). Only
SPLIT_K_MATMUL turns this on (an experiment until the serving bench measures it faster);
``bench/split_k_matmul.py`` prints the same sweep per shape.

The split's partial sums go to a float32 workspace; each program then takes a ticket for its
output tile (an atomic counter in a buffer allocated once per device), and the one that arrives
last adds the parts in split order, writes the tile and resets the counter for the next launch.
The counters are shared by every launch on a device, so launches must not overlap on two streams
(the engine runs its steps on one).
"""

from __future__ import annotations

import itertools
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgis_shard.layers import gpu

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: callers run F.linear
    triton = None

log = logging.getLogger(__name__)

ROW_CLASSES = (16, 32, 64, 128)  # the kernel's row tiles; past ~190 rows an H200 is compute-bound
MAX_ROWS = ROW_CLASSES[-1]
ENABLED = os.environ.get("SPLIT_K_MATMUL", "").lower() in ("1", "true")
SHARED_MEMORY_BYTES = 200 * 1024  # under an H100's / H200's 227 KB a block
TIMED_RUNS = 15
_TICKETS = 1 << 16  # output tiles one launch may have
_HALF = (torch.float16, torch.bfloat16)
_tickets: dict[torch.device, torch.Tensor] = {}
# (device, dtype, row class, features, depth) -> the fastest tiles measured, or None for cuBLAS.
_chosen: dict[tuple[torch.device, torch.dtype, int, int, int], Tiles | None] = {}


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


def row_class(rows: int) -> int | None:
    """The row tile a product of ``rows`` rows runs with (None: more than ``MAX_ROWS``)."""
    return next((size for size in ROW_CLASSES if rows <= size), None)


def candidates(rows: int, features: int, depth: int, multiprocessors: int) -> list[Tiles]:
    """Tiles worth timing for a product: each output-tile width and K step (wide K steps keep
    more bytes in flight; at 64 rows and more a step's rows of ``x`` take the shared memory), K
    uncut and cut into the fewest parts that give every multiprocessor a program and twice
    that, pipelined as deep as shared memory allows."""
    block_m = row_class(rows)
    if block_m is None:
        return []
    found = []
    for block_n, block_k in itertools.product((32, 64, 128), (128, 256) if block_m < 64 else (64, 128)):
        tiles = -(-features // block_n)
        enough = next((s for s in (1, 2, 4, 8, 16) if tiles * s >= multiprocessors), 16)
        stages = min(4, SHARED_MEMORY_BYTES // ((block_m + block_n) * block_k * 2))
        warps = 8 if block_m * block_n >= 128 * 64 else 4
        for splits in sorted({1, enough, min(16, 2 * enough)}):
            option = Tiles(block_n, block_k, splits, stages, warps)
            if stages >= 2 and option.fits(features, depth):
                found.append(option)
    return found


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


def tiles_for(x: torch.Tensor, weight: torch.Tensor) -> Tiles | None:
    """The tiles ``tune`` measured fastest for this product's shape and row class, where the
    kernel serves it (SPLIT_K_MATMUL set, outside torch.compile); None: the caller runs cuBLAS
    (``F.linear``), as it does for every shape and row class not tuned."""
    if not (ENABLED and _chosen) or torch.compiler.is_compiling():
        return None
    tiles = _chosen.get((x.device, x.dtype, row_class(x.shape[0]), *weight.shape))
    return tiles if tiles is not None and serves(x, weight, tiles) else None


def _device_us(run: Callable[[], object], flush: torch.Tensor) -> float:
    """Median device microseconds of ``run``, the L2 cache flushed before each (as a layer's
    weight is met in a step: read from memory, not from the cache the last layer left)."""
    run()
    pairs = []
    for _ in range(TIMED_RUNS):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs) * 1e3


def _fastest(x: torch.Tensor, weight: torch.Tensor, flush: torch.Tensor) -> Tiles | None:
    """The candidate tiles that beat cuBLAS by the most for ``x @ weight.T``; None if none does."""
    best_us, best = _device_us(lambda: F.linear(x, weight), flush), None
    for tiles in candidates(x.shape[0], weight.shape[0], weight.shape[1], gpu.multiprocessors(x.device)):
        took = _device_us(lambda t=tiles: matmul(x, weight, t), flush)
        if took < best_us:
            best_us, best = took, tiles
    return best


@torch.inference_mode()
def tune(weights: Iterable[torch.Tensor]) -> None:
    """Measures, for each distinct shape among ``weights`` (CUDA, half precision) and each row
    class, cuBLAS against every candidate, and keeps the fastest for ``tiles_for``."""
    if not ENABLED or triton is None:
        return
    shapes = {(w.device, w.dtype, *w.shape): w for w in weights if w.is_cuda and w.dtype in _HALF and w.dim() == 2}
    if not shapes:
        return
    started, won = time.monotonic(), 0
    first = next(iter(shapes.values())).device  # a shard's weights share its one device
    flush = torch.empty(2 * torch.cuda.get_device_properties(first).L2_cache_size, dtype=torch.uint8, device=first)
    for (device, dtype, features, depth), weight in shapes.items():
        for size in ROW_CLASSES:
            best = _fastest(torch.randn(size, depth, dtype=dtype, device=device), weight, flush)
            _chosen[device, dtype, size, features, depth] = best
            won += best is not None
    log.info(
        "split-K products: %d of %d shapes × row classes run faster than cuBLAS (measured in %.1f s)",
        won,
        len(shapes) * len(ROW_CLASSES),
        time.monotonic() - started,
    )


def chosen() -> dict[tuple[torch.device, torch.dtype, int, int, int], Tiles | None]:
    """What ``tune`` measured: per (device, dtype, row class, features, depth), tiles or None (cuBLAS)."""
    return dict(_chosen)


def _tickets_for(device: torch.device) -> torch.Tensor:
    """The device's output-tile counters: zero between launches (each launch's last programs
    reset theirs), allocated once so that captured graphs keep pointing at them."""
    if device not in _tickets:
        _tickets[device] = torch.zeros(_TICKETS, dtype=torch.int32, device=device)
    return _tickets[device]


if triton is not None:
    # Rows and parts stay plain arguments (no specialisation on 1 or on multiples of 16): one
    # compiled kernel per row class and tile shape serves every row count and cut. ``span`` (K
    # per part, a multiple of BLOCK_K) is specialised: known divisible by 16, each K step's
    # loads are 16-byte vectors, pipelined.
    @triton.jit(do_not_specialize=["rows", "splits"])
    def _split_k_kernel(
        x,
        weight,
        out,
        partials,
        tickets,
        rows,
        features,
        span,
        splits,
        x_row_stride,
        weight_row_stride,
        out_row_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        tile = tl.program_id(0)
        part = tl.program_id(1)
        row = tl.arange(0, BLOCK_M)
        feature = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
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
        if splits == 1:
            tl.store(target, acc.to(out.dtype.element_ty), mask=inside)
        else:
            # [splits, rows, features] float32; L2 only (.cg): another multiprocessor reads them.
            cell = row[:, None] * features + feature[None, :]
            tl.store(partials + part * rows * features + cell, acc, mask=inside, cache_modifier=".cg")
            tl.debug_barrier()  # every thread's part is stored before the ticket releases it
            arrived = tl.atomic_add(tickets + tile, 1, sem="acq_rel")
            if arrived == splits - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(splits):  # split order, whoever arrives last
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
        depth // tiles.splits,
        tiles.splits,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        BLOCK_M=row_class(rows),
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        STAGES=tiles.stages,
        num_warps=tiles.warps,
    )
    return out
