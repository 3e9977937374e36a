"""A linear layer's matrix product for a decode step of few rows, as one Triton kernel.

At one to a few rows a product is a read of the weight, and nothing else should bound it. On an
H200 at one stream cuBLAS read the 8B shape's QKV and output projections at 3.1 TB/s of the
device's 4.2, and split K into a second kernel (64 reductions of 1.7 µs a step). Here each
program owns ``BLOCK_N`` output features, reads their weight rows whole along K in
``BLOCK_K``-wide tiles (software-pipelined by Triton across ``STAGES`` tiles) and multiplies them
with all of the step's rows at once on the tensor cores, the rows padded to 16: one kernel, no
split, every byte of the weight read once.

``bench/skinny_linear.py`` times it against cuBLAS at each product of the 8B shape and sweeps
its tile sizes; nothing in the engine calls it until it is measured faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: callers run F.linear
    triton = None

MAX_ROWS = 16
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Tiles:
    """One launch's tile sizes: output features per program, the K-tile width, pipeline depth, warps."""

    block_n: int = 16
    block_k: int = 256
    stages: int = 4
    warps: int = 4


def serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel computes ``x @ weight.T``: CUDA half-precision tensors with Triton, at
    most ``MAX_ROWS`` rows, the weight's rows contiguous."""
    return (
        triton is not None
        and x.is_cuda
        and x.dtype in _HALF
        and weight.dtype == x.dtype
        and x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and weight.stride(-1) == 1
        and x.stride(-1) == 1
    )


if triton is not None:

    @triton.jit
    def _skinny_kernel(
        x,
        weight,
        bias,
        out,
        rows,
        features,
        depth,
        x_row_stride,
        weight_row_stride,
        out_row_stride,
        HAS_BIAS: tl.constexpr,
        EVEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        row = tl.arange(0, BLOCK_M)
        feature = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_K)
        row_inside = row < rows
        feature_inside = feature < features
        x_tile = x + row[:, None] * x_row_stride + k[None, :]
        weight_tile = weight + feature[:, None] * weight_row_stride + k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in tl.range(0, depth, BLOCK_K, num_stages=STAGES):
            if EVEN:
                w = tl.load(weight_tile + start, mask=feature_inside[:, None], other=0.0)
            else:
                k_inside = (start + k) < depth
                w = tl.load(weight_tile + start, mask=feature_inside[:, None] & k_inside[None, :], other=0.0)
            k_inside_x = (start + k) < depth
            xs = tl.load(x_tile + start, mask=row_inside[:, None] & k_inside_x[None, :], other=0.0)
            acc = tl.dot(xs, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(bias + feature, mask=feature_inside, other=0.0).to(tl.float32)[None, :]
        target = out + row[:, None] * out_row_stride + feature[None, :]
        tl.store(target, acc.to(out.dtype.element_ty), mask=row_inside[:, None] & feature_inside[None, :])


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles: Tiles = Tiles()
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` [rows ≤ MAX_ROWS, K] and ``weight`` [N, K] (``serves``)."""
    rows, depth = x.shape
    features = weight.shape[0]
    out = torch.empty(rows, features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(features, tiles.block_n),)
    _skinny_kernel[grid](
        x,
        weight,
        bias if bias is not None else out,  # unread without a bias
        out,
        rows,
        features,
        depth,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        EVEN=depth % tiles.block_k == 0,
        BLOCK_M=16,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        STAGES=tiles.stages,
        num_warps=tiles.warps,
    )
    return out
